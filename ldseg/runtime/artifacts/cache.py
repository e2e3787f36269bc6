"""The artifact cache: ONNX bundles and TensorRT engine sets made from a checkpoint on first use,
verified on every use, shared by every process of the user.

Layout under the root (`LDSEG_CACHE`, else platformdirs' user cache folder for "ldseg"):

    bundles/<key name>/         a validated bundle (manifest.json), named by its BundleKey
    engines/<key name>/         a TensorRT engine set (engines.json), named by its EngineKey
    <kind>/<key name>.lock      one file lock per entry: one process builds, the others wait, then reuse
    tensorrt/<...>.timing       TensorRT timing caches, one per TensorRT version and GPU
    graphs/<name>-<digest>.onnx the small volume and sample graphs, serialized (graph_cache.py)

The builders write through the staged-folder writer (ldseg.io.atomic), so an entry is either absent
or complete; an entry that fails its check (a file's SHA-256, the manifest's key fields, the
validation verdict, the engines' GPU and TensorRT version) is removed and rebuilt, with one line
saying why. Last use is the entry folder's mtime (touched on every hit).

A checkpoint whose bundle ships inside the package (the bundled demo model: ldseg/data/demo.bundle)
is served from there when that bundle passes the same check as a cache entry, so `ldseg-run --demo`
exports nothing and needs no PyTorch; a stale shipped bundle is ignored and the usual export runs.

The runtime does not import the exporter: the builders are callables handed in by whoever wires
the cache (ldseg.api), so this module and ldseg.runtime.select stay free of ldseg.export.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import filelock
import platformdirs

from ldseg.errors import ArtifactError, LdsegError, OutputError
from ldseg.io.atomic import disk_error
from ldseg.runtime.artifacts.bundle import MANIFEST, REWRITES, load_bundle
from ldseg.runtime.artifacts.engines import Environment, bundle_hash, engine_set_problems
from ldseg.versions import LDSEG_VERSION

if TYPE_CHECKING:
    from ldseg.model.network import LDSeg

CACHE_ENV = "LDSEG_CACHE"
BUNDLES, ENGINES, TENSORRT, GRAPHS = "bundles", "engines", "tensorrt", "graphs"
KINDS = (BUNDLES, ENGINES)
LOCK_SUFFIX = ".lock"

Progress = Callable[[str], None]


class StaleEntry(ArtifactError):
    """A sound entry older than what this ldseg builds (a bundle without today's rewrites): rebuilt
    where it can be, used as it is where it cannot (a runtime-only install has no PyTorch to export)."""


def _cannot_build(ready: Callable[[], None]) -> LdsegError | None:
    """Why an entry cannot be built here (`ready()`'s error), or None."""
    try:
        ready()
    except LdsegError as exc:
        return exc
    return None


def cache_root() -> Path:
    """`LDSEG_CACHE` if set, else the platform's per-user cache folder (platformdirs)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path(platformdirs.user_cache_dir("ldseg"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


@dataclass(frozen=True)
class BundleKey:
    """What makes two bundles the same: the checkpoint's content, how it was exported, and by which ldseg."""

    checkpoint_sha256: str
    preset: str  # follows from the checkpoint; kept for a readable name
    precision: str
    opset: int
    batch: int
    ldseg_version: str = LDSEG_VERSION

    @property
    def name(self) -> str:
        return (
            f"{_slug(self.preset)}-{self.checkpoint_sha256[:16]}-{self.precision}-opset{self.opset}"
            f"-b{self.batch}-ldseg{_slug(self.ldseg_version)}"
        )


@dataclass(frozen=True)
class EngineKey:
    """A bundle's engines for one GPU model and TensorRT version (engines are not portable)."""

    bundle: BundleKey
    bundle_hash: str  # SHA-256 of the bundle's manifest.json
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    max_batch: int

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return (
            f"{_slug(self.bundle.preset)}-{self.bundle.precision}-b{self.max_batch}-{_slug(self.gpu_name)}"
            f"-sm{_slug(self.compute_capability)}-trt{_slug(self.tensorrt_version)}-{digest}"
        )


class Reporter(Protocol):
    """How the cache (and the API around it) talks: the CLI prints, the Python API stays quiet."""

    def note(self, line: str) -> None: ...

    def warn(self, line: str) -> None: ...

    def building(self, action: str, path: Path) -> AbstractContextManager[Progress]:
        """Around a build ("exporting the ..."): announce it once (the CLI with a progress bar and the
        cache path); yields the builder's progress sink."""
        ...


class QuietReporter:
    """Notes are dropped, warnings go through `warnings.warn` (the Python API's default)."""

    def note(self, line: str) -> None:
        pass

    def warn(self, line: str) -> None:
        import warnings

        warnings.warn(line, UserWarning, stacklevel=3)

    @contextlib.contextmanager
    def building(self, action: str, path: Path) -> Iterator[Progress]:
        yield lambda line: None


# build_bundle(model, target, key, progress): write a *validated* bundle at `target`, atomically.
BundleBuilder = Callable[["LDSeg", Path, BundleKey, Progress], None]
# build_engines(bundle_dir, target, max_batch, timing_cache, progress): write an engine set at `target`.
EngineBuilder = Callable[[Path, Path, int, Path, Progress], None]


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint as the cache needs it: its verified content hash, and the model only on a miss."""

    sha256: str
    preset: str
    load: Callable[[], LDSeg]  # loads (builds) the model; called only when an entry must be exported
    loadable: Callable[[], None] = lambda: None  # raises before "exporting..." when the model cannot load here

    @staticmethod
    def of(model: LDSeg) -> CheckpointRef:
        if model.checkpoint_hash is None:
            raise ArtifactError("only a model loaded from a checkpoint can be cached (it has no content hash)")
        return CheckpointRef(model.checkpoint_hash, model.cfg.preset, lambda: model)


@dataclass(frozen=True)
class CacheHit:
    path: Path
    built: bool  # False: reused
    seconds: float  # build time (0 when reused)


class ArtifactCache:
    def __init__(
        self,
        root: Path | str | None = None,
        *,
        build_bundle: BundleBuilder | None = None,
        build_engines: EngineBuilder | None = None,
        reporter: Reporter | None = None,
    ):
        self.root = Path(root) if root is not None else cache_root()
        self.build_bundle = build_bundle
        self.build_engines = build_engines
        self.reporter: Reporter = reporter or QuietReporter()
        self.hits: list[CacheHit] = []  # what this cache object reused or built, in order

    # ------------------------------------------------------------------ bundles
    def bundle(
        self, checkpoint: CheckpointRef | LDSeg, *, precision: str = "fp32", opset: int = 18, batch: int = 1
    ) -> Path:
        """The validated bundle of a checkpoint: reused, or exported now (the model is loaded only then)."""
        ref = checkpoint if isinstance(checkpoint, CheckpointRef) else CheckpointRef.of(checkpoint)
        key = BundleKey(ref.sha256, ref.preset, precision, opset, batch)
        what = f"{precision} ONNX bundle of {ref.preset} (checkpoint {key.checkpoint_sha256[:12]})"
        shipped = shipped_bundle(key)
        if shipped is not None:
            self.reporter.note(f"shipped: {what} in {shipped}")
            self.hits.append(CacheHit(shipped, False, 0.0))
            return shipped
        builder = self.build_bundle
        if builder is None:
            raise ArtifactError("this artifact cache has no bundle builder")

        def build(target: Path, progress: Progress) -> None:
            builder(ref.load(), target, key, progress)

        check = functools.partial(check_bundle, key=key)
        return self.entry(BUNDLES, key.name, what, check, build, verb="exporting", ready=ref.loadable)

    # ------------------------------------------------------------------ engines
    def engines(self, bundle_dir: Path, environment: Environment, *, max_batch: int = 1) -> Path:
        """The TensorRT engine set of a cached bundle for this GPU and TensorRT: reused, or built now."""
        bundle = load_bundle(bundle_dir)
        if bundle.checkpoint_hash is None:
            raise ArtifactError(f"{bundle_dir}: the bundle records no checkpoint hash")
        key = EngineKey(
            BundleKey(bundle.checkpoint_hash, bundle.preset, bundle.precision, bundle.opset, bundle.batch),
            bundle_hash(bundle_dir),
            environment.gpu_name,
            environment.compute_capability,
            environment.trt_version,
            max_batch,
        )
        builder = self.build_engines
        if builder is None:
            raise ArtifactError("this artifact cache has no engine builder")
        timing = (
            self.root
            / TENSORRT
            / (
                f"timing-trt{_slug(environment.trt_version)}-{_slug(environment.gpu_name)}"
                f"-sm{_slug(environment.compute_capability)}.cache"
            )
        )

        def build(target: Path, progress: Progress) -> None:
            _mkdir(timing.parent)
            builder(bundle_dir, target, max_batch, timing, progress)

        def check(path: Path) -> None:
            problems = engine_set_problems(path, environment, bundle_hash=key.bundle_hash)
            if problems:
                raise ArtifactError(f"{path}: {problems[0].message}")

        what = f"{bundle.precision} TensorRT engines for {environment.gpu_name} (TensorRT {environment.trt_version})"
        return self.entry(ENGINES, key.name, what, check, build)

    # ------------------------------------------------------------------ one entry
    def entry(
        self,
        kind: str,
        name: str,
        what: str,
        check: Callable[[Path], None],
        build: Callable[[Path, Progress], None],
        *,
        verb: str = "building",
        ready: Callable[[], None] = lambda: None,
    ) -> Path:
        """The entry `kind/name`: checked and reused, or (re)built under its lock and checked.

        `check` raises ArtifactError saying what is wrong; `build(target, progress)` writes the entry
        atomically; `ready()` raises first if it cannot run here. Raises OutputError (exit 5) for a
        full disk or an unwritable cache, leaving no entry.
        """
        folder = _mkdir(self.root / kind)
        path = folder / name
        with _locked(folder / f"{name}{LOCK_SUFFIX}", path, self.reporter):
            if path.exists() or path.is_symlink():
                try:
                    check(path)
                except ArtifactError as exc:
                    missing = _cannot_build(ready) if isinstance(exc, StaleEntry) else None
                    if missing is not None:  # older but sound, and nothing here could build it again
                        self.reporter.note(f"cache: using {path} as it is ({_reason(exc, path)}; {missing})")
                        self.hits.append(CacheHit(path, False, 0.0))
                        return path
                    self.reporter.note(f"cache: rebuilding {path}: {_reason(exc, path)}")
                    remove_entry(path)
                else:
                    _touch(path)
                    self.reporter.note(f"cached: {what} in {path}")
                    self.hits.append(CacheHit(path, False, 0.0))
                    return path
            ready()
            clock = time.perf_counter()
            with self.reporter.building(f"{verb} the {what}", path) as progress:
                try:
                    build(path, progress)
                except Exception as exc:  # the builder's staged folder leaves no half entry behind
                    mapped = disk_error(path, exc)
                    if mapped is not None:
                        raise mapped from exc
                    raise
            seconds = time.perf_counter() - clock
            check(path)  # what was just built must pass the check every later use makes
            self.hits.append(CacheHit(path, True, seconds))
            self.reporter.note(f"cached {path} ({seconds:.1f} s); later runs reuse it")
            return path


def _reason(exc: ArtifactError, path: Path) -> str:
    text = str(exc)
    return text[len(str(path)) + 2 :] if text.startswith(f"{path}: ") else text


def shipped_bundles() -> list[Path]:
    """Bundles that ship inside the package (read-only), for the checkpoints shipped with it."""
    return [Path(str(resources.files("ldseg.data") / "demo.bundle"))]


def shipped_bundle(key: BundleKey) -> Path | None:
    """The shipped bundle that `key` names, if one passes check_bundle; else None (then export)."""
    for path in shipped_bundles():
        try:
            recorded = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("checkpoint_hash")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded != key.checkpoint_sha256:
            continue  # cheap: another checkpoint's bundle is not hashed at all
        try:
            check_bundle(path, key)
        except ArtifactError:
            continue
        return path
    return None


def check_bundle(path: Path, key: BundleKey) -> None:
    """A cached bundle is the one its key names: every file's SHA-256, a passed validation, same key
    fields, and the graphs rewritten as today's export rewrites them."""
    bundle = load_bundle(path)  # SHA-256 of every file; refuses a bundle without a passed validation
    found = {
        "checkpoint": bundle.checkpoint_hash,
        "precision": bundle.precision,
        "opset": bundle.opset,
        "batch": bundle.batch,
        "ldseg version": bundle.versions.get("ldseg"),
    }
    wanted = {
        "checkpoint": key.checkpoint_sha256,
        "precision": key.precision,
        "opset": key.opset,
        "batch": key.batch,
        "ldseg version": key.ldseg_version,
    }
    for field, value in wanted.items():
        if found[field] != value:
            raise ArtifactError(f"{path}: the manifest records {field} {found[field]!r}, this entry is for {value!r}")
    if bundle.rewrites != REWRITES:  # exported before a rewrite changed: the same function, older graphs
        raise StaleEntry(f"{path}: the manifest records rewrites {list(bundle.rewrites)}, today's are {list(REWRITES)}")


@contextlib.contextmanager
def _locked(lock_path: Path, entry: Path, reporter: Reporter) -> Iterator[None]:
    lock = filelock.FileLock(str(lock_path))
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            reporter.note(f"cache: another process is building {entry}; waiting for it")
            lock.acquire()
    except OSError as exc:
        raise disk_error(lock_path, exc) or OutputError(f"{lock_path}: cannot lock ({exc.strerror})") from exc
    try:
        yield
    finally:
        lock.release()


def _mkdir(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        mapped = disk_error(folder, exc)
        raise mapped or OutputError(f"{folder}: cannot create the cache folder ({exc.strerror})") from exc
    return folder


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves its entries
        os.utime(path)


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
