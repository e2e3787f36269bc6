"""The Python API: what `ldseg-run` does, for a program.

    import ldseg

    with ldseg.Segmenter(checkpoint="knee3d.safetensors") as seg:   # backend chosen, loaded once
        result = seg.segment("case1.nii.gz")[0]                    # labels on the input grid + geometry
        seg.write(["case2.nii.gz", "case3.nii.gz"], "out/")        # or files, exactly as ldseg-run writes them

`ldseg.segment(paths, checkpoint=..., output=...)` does one call's worth. A checkpoint runs on the
fastest backend here (ldseg.runtime.select.AUTO_ORDER): its ONNX bundle and TensorRT engines come
from the artifact cache (ldseg.runtime.artifacts.cache), exported or built on first use. This module is where
the cache gets its builders (the exporter and the TensorRT builder, imported only when a cache
entry is missing), so that ldseg.runtime never imports ldseg.export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ldseg.io.image2d import Image2D
from ldseg.io.nifti import Volume
from ldseg.runs.cohort import CohortInput, collect_inputs
from ldseg.runs.inference import segment_prepared
from ldseg.runs.local import run_files
from ldseg.runs.manifest import RunManifest
from ldseg.runs.outputs import run_options
from ldseg.runs.specs import ModelSpec, SamplingSpec, WriteSpec
from ldseg.runs.types import RunSummary, VolumeExtras
from ldseg.runs.volumes import prepare
from ldseg.runtime.artifacts.cache import ArtifactCache, BundleKey, Progress, QuietReporter, Reporter
from ldseg.runtime.artifacts.source import Source, demo_checkpoint_path
from ldseg.runtime.select import Selection, Wants, select_backend

if TYPE_CHECKING:
    from ldseg.model.network import LDSeg

DEMO_WARNING = (
    "the bundled demo model was trained on synthetic phantoms only: its output is not a segmentation of "
    "real anatomy. Use --checkpoint (Python: checkpoint=...) with a model trained for your data."
)
PathLike = str | Path


@dataclass(frozen=True)
class Segmentation:
    """One input's result on the input's own grid and axis order (what ldseg-run would write)."""

    path: Path
    labels: np.ndarray  # uint8 class per voxel/pixel: (X, Y, Z) for NIfTI, (H, W) for 2D images
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # "confidence", "entropy" (samples > 1), "prob<c>"
    reference: Volume | Image2D | None = None  # the input as read: its header and geometry

    @property
    def affine(self) -> np.ndarray | None:
        """Voxel-to-world matrix of a NIfTI input (None for 2D images)."""
        return self.reference.affine if isinstance(self.reference, Volume) else None


def expand_inputs(inputs: Iterable[PathLike]) -> list[Path]:
    """Files as given, folders as the inputs they hold (volume and image files, DICOM series folders),
    input lists (CSV/Parquet) as the paths they name; InputError naming what is missing or empty."""
    return [item.path for item in collect_inputs(map(Path, inputs))]


# --------------------------------------------------------------------------- the cache's builders


def build_bundle(model: LDSeg, target: Path, key: BundleKey, progress: Progress) -> None:
    """Export and validate; export_bundle writes only a bundle that passed (staged, then renamed)."""
    from ldseg.export.exporter import export_bundle

    export_bundle(model, target, opset=key.opset, precision=key.precision, batch=key.batch, progress=progress)


def build_engines(bundle_dir: Path, target: Path, max_batch: int, timing_cache: Path, progress: Progress) -> None:
    from ldseg.export.tensorrt_build import build_engines as build

    build(bundle_dir, target, max_batch=max_batch, timing_cache=timing_cache, progress=progress)


def artifact_cache(root: PathLike | None = None, reporter: Reporter | None = None) -> ArtifactCache:
    """The artifact cache (at `root`, else LDSEG_CACHE or the user cache folder) with the real builders."""
    return ArtifactCache(root, build_bundle=build_bundle, build_engines=build_engines, reporter=reporter)


@functools.cache
def _demo_hash() -> str:
    from ldseg.model.checkpoint_file import read_metadata

    return str(read_metadata(demo_checkpoint_path())["content_sha256"])


# --------------------------------------------------------------------------- Segmenter


class Segmenter:
    """A model on its backend, loaded once and kept warm across calls.

    Give one of `checkpoint` (a path, or "demo"; the default when nothing is given), `bundle` or
    `engines`; `gpu` is the GPU index every backend uses. With a checkpoint, `cache=True` takes
    bundles and engines from the artifact cache (LDSEG_CACHE or the user cache folder), a path names
    another cache folder, and `cache=False` exports into a temporary folder removed by `close()`.
    Errors are ldseg.errors exceptions; the demo model warns (UserWarning through `reporter`) before
    it segments a file.
    """

    def __init__(
        self,
        checkpoint: PathLike | None = None,
        *,
        bundle: PathLike | None = None,
        engines: PathLike | None = None,
        backend: str = "auto",
        device: str = "auto",
        gpu: int = 0,
        cache: bool | PathLike = True,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        samples: int = 1,
        trust_unvalidated: bool = False,
        precision: str = "auto",
        threads: int | None = None,
        max_samples: int | None = None,
        volume_ops: str = "auto",
        warn_demo: bool = True,
        reporter: Reporter | None = None,
    ):
        """The keywords are ModelSpec's and SamplingSpec's (ldseg.runs.specs); ValueError for a bad
        one. `max_samples`: the largest K later calls may ask for (default: `samples`)."""
        model = ModelSpec(
            None if checkpoint is None else str(checkpoint),
            None if bundle is None else Path(bundle),
            None if engines is None else Path(engines),
            backend=backend,
            device=device,
            gpu=gpu,
            precision=precision,
            threads=threads,
            max_samples=max(samples, max_samples or samples),
            cache=cache if isinstance(cache, bool) else Path(cache),
            trust_unvalidated=trust_unvalidated,
            volume_ops=volume_ops,
        )
        self._start(model, SamplingSpec(steps, sampler, seed, samples), warn_demo, reporter)

    @classmethod
    def of(
        cls,
        model: ModelSpec,
        sampling: SamplingSpec | None = None,
        *,
        warn_demo: bool = True,
        reporter: Reporter | None = None,
    ) -> Segmenter:
        """A Segmenter from the specs a front door built (ldseg-run, ldseg-serve, a Ray actor)."""
        seg = cls.__new__(cls)
        seg._start(model, sampling or SamplingSpec(), warn_demo, reporter)
        return seg

    def _start(self, model: ModelSpec, sampling: SamplingSpec, warn_demo: bool, reporter: Reporter | None) -> None:
        if sampling.samples > model.max_samples:
            raise ValueError(f"samples {sampling.samples}: more than this model's max_samples {model.max_samples}")
        self.model, self.sampling = model, sampling
        self.reporter: Reporter = reporter or QuietReporter()
        self.options = run_options(sampling)
        self._closing = contextlib.ExitStack()
        self.artifacts: ArtifactCache | None = None
        if model.checkpoint is not None and model.backend != "torch":
            cache = model.cache
            if cache is False:
                cache = Path(self._closing.enter_context(tempfile.TemporaryDirectory(prefix="ldseg-nocache-")))
                self.reporter.note(f"no cache (--no-cache): artifacts go to {cache}, removed after this run")
            self.artifacts = artifact_cache(None if cache is True else cache, self.reporter)
        self.source = Source(model.checkpoint, model.bundle, model.engines, model.trust_unvalidated, self.artifacts)
        try:
            # precision "auto": what the source holds, never a silent reduction
            wants = Wants(model.precision, model.threads, model.max_samples, model.volume_ops)
            self.selection: Selection = select_backend(self.source, model.backend, model.device, model.gpu, wants)
        except BaseException:
            self._closing.close()
            raise
        self.backend = self.selection.backend
        self.config = self.selection.config
        self._closing.callback(self.backend.close)
        self.is_demo = self.selection.checkpoint_hash == _demo_hash()
        self._warn_demo = warn_demo and self.is_demo

    @property
    def precision_asked(self) -> str:
        """The precision asked for ("auto" or a name): part of a run's key (outputs.run_key)."""
        return self.model.precision

    @property
    def why(self) -> str:
        """Why this backend (auto: what it skipped)."""
        return self.selection.why

    def _demo_warning(self) -> None:
        if self._warn_demo:
            self._warn_demo = False  # once per Segmenter
            self.reporter.warn(DEMO_WARNING)

    def segment(
        self, inputs: PathLike | Iterable[PathLike], *, probabilities: bool = False, series: str | None = None
    ) -> list[Segmentation]:
        """Segment files (or folders of them) in memory; raises on the first bad input. `series` picks
        a DICOM series in a folder holding several."""
        paths = expand_inputs([inputs] if isinstance(inputs, (str, Path)) else inputs)
        self._demo_warning()
        opts = dataclasses.replace(self.options, save_probabilities=probabilities, series=series)
        results = []
        for path in paths:
            prepared = prepare(path, self.config, series, self.backend.volume_ops())
            outputs, _ = segment_prepared(prepared, self.backend, self.config, opts)
            maps: dict[str, np.ndarray] = {s.lstrip("_"): v.astype(dtype) for s, (v, dtype) in outputs.items()}
            labels = maps.pop("seg")
            results.append(Segmentation(path, labels, maps, prepared.reference))
        return results

    def write(
        self,
        inputs: PathLike | Iterable[PathLike],
        output: PathLike,
        *,
        probabilities: bool = False,
        overwrite: bool = False,
        skip_existing: bool = False,
        fail_fast: bool = False,
        output_types: Iterable[str] = ("nifti",),
        seg_type: str = "binary",
        series: str | None = None,
        extras: VolumeExtras | None = None,
        on_done: Callable[[Path, str | None], None] | None = None,
        manifest: bool = True,
        labels: dict[Path, Path] | None = None,
        spec: WriteSpec | None = None,
    ) -> RunSummary:
        """Segment files into `output` as ldseg-run does (atomic, never overwriting without `overwrite`);
        a bad input is listed in the summary's failures and skipped (`fail_fast` stops there).
        `output_types`: nifti, nrrd, mha, dicom-seg (`seg_type` binary or fractional); `extras` adds
        files per volume (ldseg.qc). `manifest`: keep `output/ldseg-run.csv`, one row per input, and skip
        the inputs it records as done; `labels` ({input: reference label}) adds Dice to their rows.
        `spec` (a WriteSpec) replaces the keywords from `probabilities` to `series`.
        ValueError for output options that cannot be combined."""
        from ldseg.io.atomic import ensure_output_dir
        from ldseg.runs.outputs import plan_options

        if spec is None:
            spec = WriteSpec(probabilities, overwrite, skip_existing, fail_fast, tuple(output_types), seg_type, series)
        opts = plan_options(self.source, self.config, self.sampling, spec, self.model.precision)
        paths = expand_inputs([inputs] if isinstance(inputs, (str, Path)) else inputs)
        items = [CohortInput(p, (labels or {}).get(p)) for p in paths]
        out_dir = ensure_output_dir(Path(output))
        self._demo_warning()
        return run_files(
            items,
            out_dir,
            self.backend,
            self.config,
            opts,
            on_done=on_done or (lambda p, e: None),
            extras=extras,
            manifest=RunManifest(out_dir) if manifest else None,
        )

    def close(self) -> None:
        """Release the backend (and a --no-cache temporary folder)."""
        self._closing.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def segment(
    inputs: PathLike | Iterable[PathLike],
    checkpoint: PathLike | None = None,
    *,
    output: PathLike | None = None,
    backend: str = "auto",
    **options: Any,
) -> list[Segmentation] | RunSummary:
    """One call: arrays + geometry (no `output`), or files written into `output` (a RunSummary).

    `options` are Segmenter's (bundle, engines, device, cache, steps, sampler, seed, samples...) and
    the call's: segment's (probabilities, series) or, with `output`, write's (overwrite, skip_existing,
    fail_fast, output_types...). Which is which is read from their signatures, not kept by hand.
    """
    method = Segmenter.write if output is not None else Segmenter.segment
    call_keys = set(inspect.signature(method).parameters) - {"self", "inputs", "output"}
    with Segmenter(checkpoint, backend=backend, **{k: v for k, v in options.items() if k not in call_keys}) as seg:
        call = {k: v for k, v in options.items() if k in call_keys}
        return seg.segment(inputs, **call) if output is None else seg.write(inputs, output, **call)
