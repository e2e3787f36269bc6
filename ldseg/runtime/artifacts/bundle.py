"""An exported bundle on disk: manifest.json plus one ONNX file per graph.

`load_bundle` parses the manifest into frozen dataclasses, refuses formats it does not know, and
verifies the SHA-256 of every file the manifest lists before anything reads them, so a runtime
never runs a tampered or truncated graph. The schema is owned here (the runtime side); the
exporter (ldseg/export/manifest.py) writes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.choices import EXPORT_PRECISIONS  # what `ldseg-export onnx` writes
from ldseg.errors import ArtifactError
from ldseg.model.config import NON_ARCHITECTURE, ModelConfig, get_preset

BUNDLE_FORMAT = "ldseg-bundle/1"
# What today's export does to the networks' functions for its graphs (ldseg.model.layers): the
# manifest records them, and a cached bundle that records others is exported again (cache.py).
REWRITES = ("upsample_phase_interleaved", "batchnorm_folded", "denoiser_norms_fused", "attention_qkv_fused")
MANIFEST = "manifest.json"
GRAPH_NAMES = ("encoder", "denoise_step", "denoiser", "decoder", "decoder_argmax")
PRECISIONS = (*EXPORT_PRECISIONS, "int8")  # what a bundle may hold (int8: Q/DQ graphs from calibration)
_CHUNK = 1 << 20
PASSED, FAILED = "passed", "failed"  # manifest["validation"]["verdict"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]  # "batch" marks the dynamic axis
    dtype: str  # numpy dtype name

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class GraphInfo:
    name: str
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    exporter: str  # "dynamo" or "torchscript" (fallback)
    precision: str  # "fp32", "fp16" or "int8" (I/O is FP32 in every case)
    fallback_reason: str | None = None


@dataclass(frozen=True)
class Bundle:
    path: Path
    format: str
    config: ModelConfig
    precision: str
    opset: int
    batch: int  # batch the graphs were exported for (the TensorRT "opt" hint); the axis is dynamic
    graphs: Mapping[str, GraphInfo]
    sampler: str
    steps: int
    table: tuple[tuple[float, float, float, float], ...]  # sampler rows [t, a, b, c], execution order
    versions: Mapping[str, str]
    checkpoint_hash: str | None
    trained: Mapping[str, bool]
    files: Mapping[str, str]  # file name -> SHA-256
    validation: Mapping[str, Any] | None = None  # the export's (or calibration's) verdict and numbers
    rewrites: tuple[str, ...] = ()  # REWRITES as the exporting ldseg had them

    @property
    def preset(self) -> str:
        return self.config.preset

    def graph(self, name: str) -> GraphInfo:
        if name not in self.graphs:
            raise ArtifactError(f"{self.path}: bundle has no {name!r} graph (it has {', '.join(self.graphs)})")
        return self.graphs[name]

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name).file

    def table_array(self) -> np.ndarray:
        return np.asarray(self.table, dtype=np.float32).reshape(-1, 4)

    def check_compatible(self, cfg_or_preset: ModelConfig | str) -> None:
        """Refuse (ArtifactError, with the reason) a bundle built for another model."""
        cfg = get_preset(cfg_or_preset) if isinstance(cfg_or_preset, str) else cfg_or_preset
        mine = self.config
        reasons = []
        if mine.preset != cfg.preset:
            reasons.append(f"preset {mine.preset!r}, expected {cfg.preset!r}")
        if mine.image_shape != cfg.image_shape:
            reasons.append(f"image shape {mine.image_shape}, expected {cfg.image_shape}")
        if mine.num_classes != cfg.num_classes:
            reasons.append(f"{mine.num_classes} classes, expected {cfg.num_classes}")
        if mine.latent_shape != cfg.latent_shape:
            reasons.append(f"latent shape {mine.latent_shape}, expected {cfg.latent_shape}")
        if not reasons:  # same preset and shapes: the architecture fields must agree too
            differing = [
                f.name
                for f in fields(ModelConfig)
                if f.name not in NON_ARCHITECTURE and getattr(mine, f.name) != getattr(cfg, f.name)
            ]
            if differing:
                reasons.append(f"architecture differs in {', '.join(differing)}")
        if reasons:
            raise ArtifactError(f"{self.path}: bundle does not fit this model: {'; '.join(reasons)}")

    def verify(self) -> None:
        """Check every listed file against its SHA-256 (ArtifactError naming the first bad one)."""
        for name, expected in self.files.items():
            path = self.path / name
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the bundle manifest but missing")
            if sha256_file(path) != expected:
                raise ArtifactError(f"{path}: SHA-256 does not match the manifest (file altered or truncated)")


def parse_tensor(data: Mapping[str, Any]) -> TensorInfo:
    """A tensor entry of manifest.json or engines.json."""
    return TensorInfo(
        str(data["name"]), tuple(d if isinstance(d, str) else int(d) for d in data["shape"]), str(data["dtype"])
    )


def _graph(name: str, data: Mapping[str, Any]) -> GraphInfo:
    return GraphInfo(
        name=name,
        file=str(data["file"]),
        inputs=tuple(parse_tensor(t) for t in data["inputs"]),
        outputs=tuple(parse_tensor(t) for t in data["outputs"]),
        exporter=str(data["exporter"]),
        precision=str(data["precision"]),
        fallback_reason=data.get("fallback_reason"),
    )


def check_format(path: Path, data: Mapping[str, Any], expected: str, what: str, fix: str) -> str:
    """The artifact's `format`; ArtifactError (saying how to `fix` it) unless it is `expected`."""
    fmt = data.get("format")
    if fmt != expected:
        raise ArtifactError(f"{path}: {what} format {fmt!r} is not one this ldseg reads ({expected!r}); {fix}")
    return str(fmt)


def parse_manifest(path: Path, data: Mapping[str, Any]) -> Bundle:
    fmt = check_format(path, data, BUNDLE_FORMAT, "bundle", "re-export it")
    try:
        order = {name: i for i, name in enumerate(GRAPH_NAMES)}  # pipeline order, unknown names last
        items = sorted(data["graphs"].items(), key=lambda kv: order.get(kv[0], len(order)))
        graphs = {name: _graph(name, g) for name, g in items}
        files = {str(k): str(v) for k, v in data["files"].items()}
        diffusion = data["diffusion"]
        bundle = Bundle(
            path=path,
            format=fmt,
            config=ModelConfig.from_dict(data["config"]),
            precision=str(data["precision"]),
            opset=int(data["opset"]),
            batch=int(data["batch"]),
            graphs=graphs,
            sampler=str(diffusion["sampler"]),
            steps=int(diffusion["steps"]),
            table=tuple(tuple(float(v) for v in row) for row in diffusion["table"]),  # type: ignore[misc]
            versions={str(k): str(v) for k, v in data["versions"].items()},
            checkpoint_hash=data.get("checkpoint_hash"),
            trained={str(k): bool(v) for k, v in data.get("trained", {}).items()},
            files=files,
            validation=data.get("validation"),
            rewrites=tuple(str(r) for r in data.get("rewrites", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: manifest is incomplete or malformed ({type(exc).__name__}: {exc})") from exc
    unknown = sorted(set(graphs) - set(GRAPH_NAMES))
    unhashed = sorted(g.file for g in graphs.values() if g.file not in files)
    if unknown or unhashed or bundle.precision not in PRECISIONS:
        raise ArtifactError(
            f"{path}: manifest is inconsistent (unknown graphs {unknown}, files without a hash {unhashed}, "
            f"precision {bundle.precision!r})"
        )
    if len(bundle.table) != bundle.steps:
        raise ArtifactError(f"{path}: sampler table has {len(bundle.table)} rows for {bundle.steps} steps")
    return bundle


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; ArtifactError naming the file and `what` it should be otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: {what} is not a JSON object")
    return data


def check_validated(bundle: Bundle) -> None:
    """Refuse, in one sentence, a bundle whose manifest records a failed validation or none."""
    record = bundle.validation
    verdict = record.get("verdict") if isinstance(record, Mapping) else None
    if verdict == PASSED:
        return
    if verdict == FAILED:
        summary = record.get("summary") if isinstance(record, Mapping) else None
        why = f" ({summary})" if summary else ""
        raise ArtifactError(
            f"{bundle.path}: this bundle failed its validation{why}; "
            "re-export it, or pass --trust-unvalidated to use it anyway"
        )
    raise ArtifactError(
        f"{bundle.path}: the manifest records no validation verdict (exported without validation or by an "
        "older ldseg); re-export it, or pass --trust-unvalidated to use it anyway"
    )


def load_bundle(path: Path | str, *, verify: bool = True, trust_unvalidated: bool = False) -> Bundle:
    """Read and check a bundle folder. `verify=False` skips the hashes (inspection only); a bundle
    whose validation failed or was never recorded is refused unless `trust_unvalidated`."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{path}: not an ldseg bundle (no {MANIFEST})")
    bundle = parse_manifest(path, read_json_object(manifest, "manifest"))
    if verify:
        bundle.verify()
    if not trust_unvalidated:
        check_validated(bundle)
    return bundle
