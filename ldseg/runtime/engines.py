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
     "engines": {graph: {"file", "bytes", "sha256", "build_seconds", "inputs", "outputs"}}}

Engines are not portable: TensorRT refuses (or worse, misbehaves with) a plan made by another
TensorRT version or for another GPU model, so the set records both and `check_engine_set` compares
them with the machine it is about to run on, before TensorRT sees a byte. Nothing here imports
TensorRT at module level: this file is what tests and `build-engine --check` use without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.config import ModelConfig
from ldseg.runtime import trt_compat
from ldseg.runtime.bundle import MANIFEST, TensorInfo, check_format, parse_tensor, read_json_object, sha256_file
from ldseg.runtime.trt_compat import major_of

if TYPE_CHECKING:
    import tensorrt as trt

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
        return {i.name: {"min": list(i.min), "opt": list(i.opt), "max": list(i.max)} for i in self.inputs}

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

    @property
    def max_batch(self) -> int:
        return min(p.max_batch for p in self.profiles.values())

    @property
    def min_batch(self) -> int:
        return max(p.min_batch for p in self.profiles.values())

    def engine_path(self, graph: str) -> Path:
        if graph not in self.engines:
            raise ArtifactError(f"{self.path}: engine set has no {graph!r} engine (it has {', '.join(self.engines)})")
        return self.path / self.engines[graph].file

    @property
    def tensorrt_major(self) -> int:
        return major_of(self.tensorrt_version)

    def to_dict(self) -> dict[str, Any]:
        def tensors(ts: Sequence[TensorInfo]) -> list[dict[str, Any]]:
            return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]

        return {
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
            "engines": {
                g: {
                    "file": e.file,
                    "bytes": e.bytes,
                    "sha256": e.sha256,
                    "build_seconds": e.build_seconds,
                    "inputs": tensors(e.inputs),
                    "outputs": tensors(e.outputs),
                    "layers_file": e.layers_file,
                }
                for g, e in self.engines.items()
            },
        }

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
                    tuple(
                        InputProfile(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
                        for name, s in p["inputs"].items()
                    ),
                )
                for g, p in data["profiles"].items()
            }
            engines = {
                g: EngineFile(
                    graph=g,
                    file=str(e["file"]),
                    bytes=int(e["bytes"]),
                    sha256=str(e["sha256"]),
                    build_seconds=float(e["build_seconds"]),
                    inputs=tuple(parse_tensor(t) for t in e["inputs"]),
                    outputs=tuple(parse_tensor(t) for t in e["outputs"]),
                    layers_file=e.get("layers_file"),
                )
                for g, e in data["engines"].items()
            }
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
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{path}: {ENGINES_JSON} is incomplete or malformed ({type(exc).__name__}: {exc})"
            ) from exc


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
    for entry in es.engines.values():
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


def require_tensorrt() -> ModuleType:
    """The real TensorRT module, or BackendUnavailable saying why not.

    `import tensorrt` succeeding proves nothing: with only `tensorrt-stubs` installed (the dev
    setup: type stubs, no libraries) it yields an empty namespace package. Real TensorRT has
    `Builder` and `__version__`.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        raise BackendUnavailable(
            f"TensorRT is not importable ({type(exc).__name__}: {exc}): pip install -e '.[tensorrt]' "
            "(Jetson: JetPack's python3-libnvinfer)"
        ) from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = ", ".join(str(p) for p in getattr(trt, "__path__", [])) or "?"
        raise BackendUnavailable(
            f"TensorRT is not installed: `tensorrt` imports as an empty package ({where}), i.e. only "
            "type stubs (tensorrt-stubs) are present: pip install -e '.[tensorrt]' on a machine with an NVIDIA GPU"
        )
    return trt


TRT_LOG = logging.getLogger("ldseg.tensorrt")
TRT_LOG.addHandler(logging.NullHandler())  # quiet unless the application configures logging


def trt_logger() -> trt.ILogger:
    """TensorRT's messages go to the `ldseg.tensorrt` logger (not Python warnings: TensorRT warns a
    lot, and the CLI must not print each as a RuntimeWarning); errors are also kept, so a failed
    build or run can say why in its one error line."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0 < ERROR 1 < WARNING 2 < INFO 3 < VERBOSE 4
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            TRT_LOG.log(_LOG_LEVELS.get(level, logging.DEBUG), "TensorRT: %s", msg)

    return _Logger()


_LOG_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}


def logged_errors(logger: trt.ILogger) -> str:
    errors: list[str] = getattr(logger, "errors", [])
    return "; ".join(errors[-5:]) if errors else "no error was logged"


def detect_environment(device: int = 0) -> Environment:
    """TensorRT version and GPU `device` of this machine; BackendUnavailable if either is absent."""
    trt = require_tensorrt()
    from ldseg.runtime.cuda import gpu_info

    trt_compat.check_version(str(trt.__version__))  # refuses a TensorRT older than 10.3
    gpu = gpu_info(device)
    return Environment(str(trt.__version__), gpu.name, gpu.compute_capability)


def check_engines_here(engines_dir: Path | str, *, bundle_dir: Path | str | None = None, device: int = 0) -> list[str]:
    """`build-engine --check`: reasons the engine set cannot run on this machine (empty: it can).

    Raises BackendUnavailable if TensorRT does not import or no GPU is present (nothing to compare).
    """
    env = detect_environment(device)
    expected = bundle_hash(bundle_dir) if bundle_dir is not None else None
    return check_engine_set(engines_dir, env, bundle_hash=expected)
