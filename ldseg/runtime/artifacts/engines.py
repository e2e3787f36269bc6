"""TensorRT engine sets on disk: engines.json and the checks that say whether a set can run here.

The runtime reads and checks engine sets; the builder (ldseg/export/tensorrt_build.py, with its
pure pieces in ldseg/export/build_options.py) writes them through `EngineSet.to_dict`.

An engine set is a folder with one serialized engine per graph and `engines.json`:

    {"format": "ldseg-engines/1",
     "bundle": {"path", "manifest_sha256", "precision", "preset"},   # what it was built from
     "tensorrt_version", "tensorrt_major", "gpu": {"name", "compute_capability"},  # where it can run
     "precision", "dla_core", "builder": {...}, "profiles": {graph: {input: {min, opt, max}}},
     "config", "diffusion": {"sampler", "steps", "table"},           # enough to run without the bundle
     "built_at", "build_seconds",
     "engines": {graph: {"file", "bytes", "sha256", "build_seconds", "inputs", "outputs"}},
     "volume_ops": {"max_input_grid", "profiles": {graph: {input: {min, opt, max}}},   # optional
                    "engines": {graph: {...as above}}}}

`volume_ops` (absent in sets built without them, or before they existed) holds the pre/post-processing
engines (ldseg/runtime/volume_graphs.py in float32: min-max and zoom to the model grid, the class
step, the map back), with profiles over input grids up to `max_input_grid` voxels per axis, and,
in sets built for K >= 2 samples, the sample engines (ldseg/runtime/sample_graphs.py: sum and votes,
mean, confidence, vote entropy) with profiles fixed to the model grid and K up to the max batch.

Engines are not portable: TensorRT refuses (or worse, misbehaves with) a plan made by another
TensorRT version or for another GPU model, so the set records both and `check_engine_set` compares
them with the machine it is about to run on, before TensorRT sees a byte. Nothing here imports
TensorRT: loading it and asking the GPU is ldseg/runtime/backends/tensorrt/probe.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldseg.errors import ArtifactError
from ldseg.model.config import ModelConfig
from ldseg.runtime.artifacts.bundle import (
    MANIFEST,
    TensorInfo,
    check_format,
    parse_tensor,
    read_json_object,
    sha256_file,
)

ENGINES_FORMAT = "ldseg-engines/1"
ENGINES_JSON = "engines.json"
ENGINE_SUFFIX = ".engine"
# What a run needs (decoder: probabilities, which `ldseg-run` always asks for); denoiser on request.
REQUIRED_GRAPHS = ("encoder", "denoise_step", "decoder_argmax")
RUNTIME_GRAPHS = ("encoder", "denoise_step", "decoder", "decoder_argmax")

# --------------------------------------------------------------------------- engines.json


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile over the batch axis (every other axis is static in a bundle)."""

    graph: str
    min_batch: int
    opt_batch: int
    max_batch: int
    inputs: tuple[InputProfile, ...]

    def to_dict(self) -> dict[str, Any]:
        return _profile_dict(self.inputs)

    def accepts(self, batch: int) -> bool:
        return self.min_batch <= batch <= self.max_batch


@dataclass(frozen=True)
class EngineFile:
    graph: str
    file: str
    bytes: int
    sha256: str
    build_seconds: float
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layers_file: str | None = None  # engine inspector JSON (which layers really run in INT8...)


@dataclass(frozen=True)
class EngineSet:
    path: Path
    bundle_path: str
    bundle_hash: str  # SHA-256 of the bundle's manifest.json (which hashes every graph)
    bundle_precision: str
    preset: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    dla_core: int | None
    profiles: Mapping[str, BatchProfile]
    engines: Mapping[str, EngineFile]
    config: ModelConfig
    sampler: str
    steps: int
    table: tuple[tuple[float, ...], ...]
    built_at: str
    build_seconds: float
    builder: Mapping[str, Any] = field(default_factory=dict)
    format: str = ENGINES_FORMAT
    volume_engines: Mapping[str, EngineFile] = field(default_factory=dict)
    volume_profiles: Mapping[str, tuple[InputProfile, ...]] = field(default_factory=dict)
    max_input_grid: int = 0  # per axis; 0: no volume engines

    @property
    def max_batch(self) -> int:
        return min(p.max_batch for p in self.profiles.values())

    @property
    def min_batch(self) -> int:
        return max(p.min_batch for p in self.profiles.values())

    def engine_path(self, graph: str) -> Path:
        known = {**self.engines, **self.volume_engines}
        if graph not in known:
            raise ArtifactError(f"{self.path}: engine set has no {graph!r} engine (it has {', '.join(known)})")
        return self.path / known[graph].file

    def all_engines(self) -> list[EngineFile]:
        return [*self.engines.values(), *self.volume_engines.values()]

    @property
    def tensorrt_major(self) -> int:
        return major_of(self.tensorrt_version)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "bundle": {
                "path": self.bundle_path,
                "manifest_sha256": self.bundle_hash,
                "precision": self.bundle_precision,
                "preset": self.preset,
            },
            "tensorrt_version": self.tensorrt_version,
            "tensorrt_major": self.tensorrt_major,  # engines never cross majors (10: Jetson, 11: x86 pip)
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "precision": self.precision,
            "dla_core": self.dla_core,
            "builder": dict(self.builder),
            "profiles": {
                g: {"min_batch": p.min_batch, "opt_batch": p.opt_batch, "max_batch": p.max_batch, "inputs": p.to_dict()}
                for g, p in self.profiles.items()
            },
            "config": self.config.to_dict(),
            "diffusion": {"sampler": self.sampler, "steps": self.steps, "table": [list(r) for r in self.table]},
            "built_at": self.built_at,
            "build_seconds": self.build_seconds,
            "engines": {g: _engine_dict(e) for g, e in self.engines.items()},
        }
        if self.volume_engines:
            out["volume_ops"] = {
                "max_input_grid": self.max_input_grid,
                "profiles": {g: _profile_dict(p) for g, p in self.volume_profiles.items()},
                "engines": {g: _engine_dict(e) for g, e in self.volume_engines.items()},
            }
        return out

    @staticmethod
    def from_dict(path: Path, data: Mapping[str, Any]) -> EngineSet:
        check_format(path, data, ENGINES_FORMAT, "engine set", "rebuild it")
        try:
            bundle, gpu, diffusion = data["bundle"], data["gpu"], data["diffusion"]
            profiles = {
                g: BatchProfile(
                    g,
                    int(p["min_batch"]),
                    int(p["opt_batch"]),
                    int(p["max_batch"]),
                    _parse_inputs(p["inputs"]),
                )
                for g, p in data["profiles"].items()
            }
            engines = {g: _parse_engine(g, e) for g, e in data["engines"].items()}
            volume = data.get("volume_ops") or {"engines": {}, "profiles": {}, "max_input_grid": 0}
            dla = data.get("dla_core")
            return EngineSet(
                path=path,
                bundle_path=str(bundle["path"]),
                bundle_hash=str(bundle["manifest_sha256"]),
                bundle_precision=str(bundle["precision"]),
                preset=str(bundle["preset"]),
                precision=str(data["precision"]),
                tensorrt_version=_tensorrt_version(data),
                gpu_name=str(gpu["name"]),
                compute_capability=str(gpu["compute_capability"]),
                dla_core=None if dla is None else int(dla),
                profiles=profiles,
                engines=engines,
                config=ModelConfig.from_dict(data["config"]),
                sampler=str(diffusion["sampler"]),
                steps=int(diffusion["steps"]),
                table=tuple(tuple(float(v) for v in row) for row in diffusion["table"]),
                built_at=str(data["built_at"]),
                build_seconds=float(data["build_seconds"]),
                builder=dict(data.get("builder", {})),
                volume_engines={g: _parse_engine(g, e) for g, e in volume["engines"].items()},
                volume_profiles={g: _parse_inputs(p) for g, p in volume["profiles"].items()},
                max_input_grid=int(volume["max_input_grid"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{path}: {ENGINES_JSON} is incomplete or malformed ({type(exc).__name__}: {exc})"
            ) from exc


def _profile_dict(inputs: Sequence[InputProfile]) -> dict[str, Any]:
    return {i.name: {"min": list(i.min), "opt": list(i.opt), "max": list(i.max)} for i in inputs}


def _parse_inputs(data: Mapping[str, Any]) -> tuple[InputProfile, ...]:
    return tuple(
        InputProfile(name, tuple(int(v) for v in s["min"]), tuple(int(v) for v in s["opt"]),
                     tuple(int(v) for v in s["max"]))
        for name, s in data.items()
    )  # fmt: skip


def _engine_dict(e: EngineFile) -> dict[str, Any]:
    def tensors(ts: Sequence[TensorInfo]) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]

    return {
        "file": e.file,
        "bytes": e.bytes,
        "sha256": e.sha256,
        "build_seconds": e.build_seconds,
        "inputs": tensors(e.inputs),
        "outputs": tensors(e.outputs),
        "layers_file": e.layers_file,
    }


def _parse_engine(graph: str, e: Mapping[str, Any]) -> EngineFile:
    return EngineFile(
        graph=graph,
        file=str(e["file"]),
        bytes=int(e["bytes"]),
        sha256=str(e["sha256"]),
        build_seconds=float(e["build_seconds"]),
        inputs=tuple(parse_tensor(t) for t in e["inputs"]),
        outputs=tuple(parse_tensor(t) for t in e["outputs"]),
        layers_file=e.get("layers_file"),
    )


def _tensorrt_version(data: Mapping[str, Any]) -> str:
    """The recorded version; a recorded major must agree with it (ValueError: malformed)."""
    version = str(data["tensorrt_version"])
    major = major_of(version)
    recorded = data.get("tensorrt_major")  # absent in sets written before it was recorded
    if recorded is not None and int(recorded) != major:
        raise ValueError(f"tensorrt_major {recorded} contradicts tensorrt_version {version}")
    return version


def read_engine_set(folder: Path | str) -> EngineSet:
    """Parse `folder/engines.json` (ArtifactError if absent or malformed); files are not checked."""
    folder = Path(folder)
    path = folder / ENGINES_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{folder}: not an ldseg engine set (no {ENGINES_JSON}); build one with `ldseg-export build-engine`"
        )
    return EngineSet.from_dict(folder, read_json_object(path, "engine-set description"))


def bundle_hash(bundle_dir: Path | str) -> str:
    """The identity of a bundle: SHA-256 of its manifest.json, which lists every graph's SHA-256."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{bundle_dir}: not an ldseg bundle (no {MANIFEST})")
    return sha256_file(path)


def major_of(version: str) -> int:
    """'10.3.0.30' -> 10; ValueError for something that is not a version."""
    return int(str(version).split(".", 1)[0])


# --------------------------------------------------------------------------- environment checks


@dataclass(frozen=True)
class Environment:
    """Where an engine set is about to run (tests fake this)."""

    trt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class Problem:
    kind: Literal["artifact", "environment"]  # a broken/other set vs. a set for another machine
    message: str


def engine_set_problems(
    engines_dir: Path | str, environment: Environment, *, bundle_hash: str | None = None
) -> list[Problem]:
    """Every reason the engine set cannot run in `environment` (empty: usable)."""
    folder = Path(engines_dir)
    try:
        es = read_engine_set(folder)
    except ArtifactError as exc:
        return [Problem("artifact", str(exc))]
    problems: list[Problem] = []
    if bundle_hash is not None and es.bundle_hash != bundle_hash:
        problems.append(
            Problem(
                "artifact",
                f"built from another bundle (manifest SHA-256 {es.bundle_hash[:12]}..., this bundle has "
                f"{bundle_hash[:12]}...): rebuild from this bundle",
            )
        )
    if es.tensorrt_major != major_of(environment.trt_version):
        problems.append(
            Problem(
                "environment",
                f"built with TensorRT {es.tensorrt_version} (major {es.tensorrt_major}), this machine has TensorRT "
                f"{environment.trt_version} (major {major_of(environment.trt_version)}): a TensorRT major cannot "
                "load another's engines (Jetson stays on 10, x86 pip is 11)",
            )
        )
    elif es.tensorrt_version != environment.trt_version:
        problems.append(
            Problem(
                "environment",
                f"built with TensorRT {es.tensorrt_version}, this machine has TensorRT {environment.trt_version} "
                "(engines are not portable across TensorRT versions)",
            )
        )
    if es.gpu_name != environment.gpu_name or es.compute_capability != environment.compute_capability:
        problems.append(
            Problem(
                "environment",
                f"built for {es.gpu_name} (compute capability {es.compute_capability}), this GPU is "
                f"{environment.gpu_name} (compute capability {environment.compute_capability})",
            )
        )
    missing = [g for g in REQUIRED_GRAPHS if g not in es.engines]
    if missing:
        problems.append(Problem("artifact", f"engines for {', '.join(missing)} are missing from {ENGINES_JSON}"))
    for entry in es.all_engines():
        path = folder / entry.file
        if not path.is_file():
            problems.append(Problem("artifact", f"{path}: listed in {ENGINES_JSON} but missing"))
        elif sha256_file(path) != entry.sha256:
            problems.append(
                Problem("artifact", f"{path}: SHA-256 does not match {ENGINES_JSON} (file altered or truncated)")
            )
    return problems


def check_engine_set(engines_dir: Path | str, environment: Environment, *, bundle_hash: str | None = None) -> list[str]:
    """Reasons (sentences) why the engine set cannot run in `environment`; empty when it can."""
    return [p.message for p in engine_set_problems(engines_dir, environment, bundle_hash=bundle_hash)]
