"""What a run is asked for, as typed values built once at each front door (ldseg-run, ldseg-serve,
ldseg.api.Segmenter, a Ray actor) and passed down whole: no option dicts across layers.

- ModelSpec: which model on what (source, backend, device, precision, threads, the largest K).
- SamplingSpec: how each input is sampled (steps, sampler, seed, K).
- WriteSpec: which files a run into a folder writes, and how (formats, probabilities, resume rules).

Each rule lives here once (K >= 1, a choice among its one list in ldseg.choices, --overwrite against
--skip-existing); a bad value is a ValueError in the option's words (the CLI turns it into a usage
error, exit 2). runs/outputs.plan_options turns the specs into the RunOptions a run goes by (the
same field names, copied by name) and derives the run key from every field but NOT_IN_RUN_KEY;
which files K > 1 writes is runs/outputs.output_suffixes.

A new ldseg-run option: the CLI signature, one field here (and in RunOptions if the run steps read
it), and the code that uses it; it enters the run key unless it is named in NOT_IN_RUN_KEY.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldseg.choices import (
    BACKEND_CHOICES,
    OUTPUT_TYPES,
    RUN_PRECISIONS,
    SAMPLERS,
    SEG_TYPES,
    VOLUME_OPS,
    check_choice,
    check_device,
)


def _at_least(what: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"{what} must be at least {low} (got {value})")


@dataclass(frozen=True)
class ModelSpec:
    """The model and where it runs. Exactly one of checkpoint/bundle/engines (none: the demo model).

    `cache`: True takes a checkpoint's bundle and engines from the artifact cache (LDSEG_CACHE or the
    user cache folder), a path names another cache folder, False exports into a temporary folder.
    `max_samples`: the largest K a run asks of this model (TensorRT engines are built for it; a
    backend that cannot take it is refused before anything is built)."""

    checkpoint: str | None = None
    bundle: Path | None = None
    engines: Path | None = None
    backend: str = "auto"
    device: str = "auto"
    gpu: int = 0
    precision: str = "auto"
    threads: int | None = None
    max_samples: int = 1
    cache: bool | Path = True
    trust_unvalidated: bool = False
    volume_ops: str = "auto"  # "cpu": pre/post-processing on the CPU path whatever the device offers

    def __post_init__(self) -> None:
        given = [s for s in (self.checkpoint, self.bundle, self.engines) if s is not None]
        if len(given) > 1:
            raise ValueError("give exactly one of --checkpoint, --bundle, --engines")
        if not given:
            object.__setattr__(self, "checkpoint", "demo")
        for name in ("bundle", "engines"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if not isinstance(self.cache, bool):
            object.__setattr__(self, "cache", Path(self.cache))
        check_choice("--backend", self.backend, BACKEND_CHOICES)
        check_device(self.device)
        check_choice("--precision", self.precision, RUN_PRECISIONS)
        check_choice("--volume-ops", self.volume_ops, VOLUME_OPS)
        if self.gpu < 0 or (self.gpu and self.device == "cpu"):
            raise ValueError("--gpu N is a GPU index >= 0, and contradicts --device cpu")
        _at_least("--threads", self.threads, 1)
        _at_least("--max-samples", self.max_samples, 1)


@dataclass(frozen=True)
class SamplingSpec:
    """How each input is sampled: `samples` K draws (seeds seed..seed+K-1) from one encoder run."""

    steps: int | None = None  # None: the checkpoint's
    sampler: str | None = None  # None: the checkpoint's
    seed: int = 0
    samples: int = 1

    def __post_init__(self) -> None:
        _at_least("--samples", self.samples, 1)
        _at_least("--steps", self.steps, 1)
        if self.sampler is not None:
            check_choice("--sampler", self.sampler, SAMPLERS)


# WriteSpec fields that decide how a run proceeds, not what it writes (outputs.run_key leaves them out).
NOT_IN_RUN_KEY = frozenset({"overwrite", "skip_existing", "fail_fast"})


@dataclass(frozen=True)
class WriteSpec:
    """What a run into a folder writes: every map in each volume format asked for (dicom-seg: one SEG)."""

    save_probabilities: bool = False  # also the per-class probability maps
    overwrite: bool = False
    skip_existing: bool = False  # an input whose outputs all exist is skipped (resume)
    fail_fast: bool = False
    output_types: tuple[str, ...] = ("nifti",)
    seg_type: str = "binary"  # DICOM SEG: binary | fractional
    series: str | None = None  # DICOM SeriesInstanceUID to read from a folder holding several

    def __post_init__(self) -> None:
        types = tuple(dict.fromkeys(self.output_types))
        object.__setattr__(self, "output_types", types)
        unknown = [t for t in types if t not in OUTPUT_TYPES]
        if unknown or not types:
            raise ValueError(f"--output-type {', '.join(unknown) or '(none)'}: choose from {', '.join(OUTPUT_TYPES)}")
        if self.seg_type not in SEG_TYPES:
            raise ValueError(f"--seg-type {self.seg_type}: choose binary or fractional")
        if self.overwrite and self.skip_existing:
            raise ValueError("--overwrite and --skip-existing contradict each other: choose one")
