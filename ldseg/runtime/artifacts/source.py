"""Where a model comes from: a checkpoint (the bundled demo one by name), a bundle or an engine set.

A checkpoint's config and verified content hash are read here without PyTorch (its header and
safetensors' numpy reader): a runtime-only install runs a checkpoint whose bundle is already in the
artifact cache. Loading the model itself (the torch backend, or exporting a missing cache entry)
needs the export extra, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.checkpoint_file import read_metadata, verified_metadata
from ldseg.model.config import ModelConfig

if TYPE_CHECKING:
    from ldseg.model.network import LDSeg
    from ldseg.runtime.artifacts.cache import ArtifactCache, CheckpointRef

SEGMENT_NEEDS = ("image_encoder", "denoiser", "label_decoder")
RECONSTRUCT_NEEDS = ("label_encoder", "label_decoder")
EXPORT_EXTRA = "pip install 'ldseg[export]'"


def demo_checkpoint_path() -> Path:
    return Path(str(resources.files("ldseg.data") / "demo.safetensors"))


def resolve_checkpoint(name: str | Path) -> Path:
    """`demo` names the bundled model; anything else is a path."""
    path = demo_checkpoint_path() if str(name) == "demo" else Path(name)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    return path


def source_config(checkpoint: str | None, bundle: Path | None, engines: Path | None) -> ModelConfig:
    """The model configuration behind a source, read from its header or manifest without loading
    any weights (a Ray driver plans outputs with it; its actors load the model)."""
    if bundle is not None:
        from ldseg.runtime.artifacts.bundle import load_bundle

        return load_bundle(bundle, verify=False, trust_unvalidated=True).config
    if engines is not None:
        from ldseg.runtime.artifacts.engines import read_engine_set

        return read_engine_set(engines).config
    return ModelConfig.from_dict(read_metadata(resolve_checkpoint(checkpoint or "demo"))["config"])


def refuse_untrained(source: Path, trained: dict[str, bool], needs: tuple[str, ...]) -> None:
    missing = [name for name in needs if not trained.get(name, False)]
    if missing:
        raise ArtifactError(
            f"{source}: component(s) {', '.join(missing)} hold no trained weights "
            "(the official release has no denoiser: train one with ldseg-train)"
        )


def torch_missing(what: str) -> BackendUnavailable | None:
    """Why `what` cannot run here (PyTorch is not installed: the runtime-only install), or None."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return BackendUnavailable(f"{what} needs PyTorch, which this runtime-only install lacks: {EXPORT_EXTRA}")
    return None


def load_model(checkpoint: str | Path, needs: tuple[str, ...] = SEGMENT_NEEDS) -> LDSeg:
    problem = torch_missing(f"loading the model of {checkpoint}")
    if problem is not None:
        raise problem
    from ldseg.model.checkpoint import load_checkpoint

    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint(path)
    refuse_untrained(path, model.trained, needs)
    return model


@dataclass(frozen=True)
class Source:
    """Exactly one of checkpoint, bundle, engines (plus the cache that turns a checkpoint into the others)."""

    checkpoint: str | None = None
    bundle: Path | None = None
    engines: Path | None = None
    trust_unvalidated: bool = False  # load a bundle whose manifest records no passed validation
    artifacts: ArtifactCache | None = None  # exports/builds a checkpoint's bundle and engines on first use
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def model(self) -> LDSeg:
        """The checkpoint's model, loaded (and its hash verified) once however many candidates use it."""
        assert self.checkpoint is not None
        if "model" not in self._memo:
            self._memo["model"] = load_model(self.checkpoint)
        return self._memo["model"]  # type: ignore[no-any-return]

    def reference(self) -> CheckpointRef:
        """The checkpoint as the cache keys it: content hash verified, trained components checked, and
        the model built only if an entry must be exported (a cache hit never builds it)."""
        from ldseg.runtime.artifacts.cache import CheckpointRef

        assert self.checkpoint is not None
        if "reference" not in self._memo:
            path = resolve_checkpoint(self.checkpoint)
            meta = verified_metadata(path)
            refuse_untrained(path, dict(meta.get("trained", {})), SEGMENT_NEEDS)
            preset = str(meta.get("config", {}).get("preset", "model"))
            self._memo["reference"] = CheckpointRef(str(meta["content_sha256"]), preset, self.model, self._exportable)
        return self._memo["reference"]  # type: ignore[no-any-return]

    def _exportable(self) -> None:
        """Exporting into the cache loads the model: without PyTorch, say so before announcing it."""
        problem = torch_missing(f"exporting {self.checkpoint} into the artifact cache (a cache miss)")
        if problem is not None:
            raise problem

    @property
    def kind(self) -> str:
        """ "checkpoint", "bundle" or "engines": how the model is given (ldseg.runtime.backends.declaration)."""
        return "engines" if self.engines is not None else "bundle" if self.bundle is not None else "checkpoint"

    @property
    def cached(self) -> bool:
        """A checkpoint with a cache: every backend can run it."""
        return self.checkpoint is not None and self.artifacts is not None


CACHED_BUNDLE_PRECISION = "fp32"  # what a checkpoint is exported to for the bundle backends


def bundle_path(source: Source) -> Path:
    """The bundle a bundle backend runs: the one given, or the checkpoint's FP32 export from the cache
    (exported now if missing)."""
    if source.bundle is not None:
        return source.bundle
    assert source.cached and source.artifacts is not None  # Declaration.runs checked it
    return source.artifacts.bundle(source.reference(), precision=CACHED_BUNDLE_PRECISION)


def bundle_precision(source: Source) -> str:
    """The precision of the bundle a bundle backend would run, known without exporting: the given
    bundle's manifest, or what a checkpoint is exported to."""
    if source.bundle is None:
        return CACHED_BUNDLE_PRECISION
    from ldseg.runtime.artifacts.bundle import MANIFEST, read_json_object

    return str(read_json_object(source.bundle / MANIFEST, "bundle manifest").get("precision", "fp32"))
