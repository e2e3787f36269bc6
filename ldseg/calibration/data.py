"""Calibration data: the user's volumes (or phantoms), and every graph's inputs along the real
FP32 pipeline run on them with ONNX Runtime.

The denoiser's activations depend on t, so the denoise_step graph is calibrated on its inputs at
*every* step of the sampler trajectory (z_t, z_image, the coefficient row [t, a, b, c], the
noise), not on random latents; the encoder on the preprocessed images; the decoders on the final
latents the trajectory ends in. Sampling seeds are fixed per volume, so calibration is
reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("INT8 calibration"):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader

from ldseg.errors import InputError
from ldseg.model.config import ModelConfig
from ldseg.model.sampling import draw_noise
from ldseg.runs.volumes import NIFTI_SUFFIXES, prepare, prepare_label, stem
from ldseg.runtime.artifacts.bundle import Bundle

PHANTOMS = "phantoms"
# Phantom seeds: training uses 9_000+ (validation) and 10_000+ (training), evaluation 0..999.
# Calibration takes its own range; the held-out volumes are evaluation phantoms 0, 1, ...
CALIBRATION_SEED0 = 20_000
HOLDOUT_SEED0 = 0
SAMPLING_SEED = 0  # sampling seed of volume i is SAMPLING_SEED + i (as `ldseg-run --seed 0`)

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class CalibrationVolume:
    name: str
    image: np.ndarray  # (C, *grid) float32, on the model grid
    label: np.ndarray | None = None  # (*grid) uint8 ground truth, when known (phantoms, DIR/labels)


def _nifti_files(folder: Path) -> list[Path]:
    for candidate in (folder, folder / "images"):
        if candidate.is_dir():
            files = sorted(
                p
                for p in candidate.iterdir()
                if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
            )
            if files:
                return files
    raise InputError(f"{folder}: no NIfTI volumes (*.nii.gz or *.nii) in it or in {folder / 'images'}")


def _label_for(path: Path, cfg: ModelConfig) -> np.ndarray | None:
    """DIR/labels/<stem>.nii[.gz] beside DIR/images/, when present (used for Dice vs. truth)."""
    for suffix in NIFTI_SUFFIXES:
        candidate = path.parent.parent / "labels" / f"{stem(path)}{suffix}"
        if path.parent.name == "images" and candidate.is_file():
            return prepare_label(candidate, cfg).astype(np.uint8)
    return None


def _phantom(cfg: ModelConfig, seed: int) -> CalibrationVolume:
    from ldseg.data.phantoms import make_phantom
    from ldseg.io.preprocess import min_max_standardize

    if cfg.num_classes not in (2, 3):
        raise InputError(
            f"phantoms have 2 or 3 classes; preset {cfg.preset!r} has {cfg.num_classes}: calibrate on --data DIR"
        )
    ph = make_phantom(seed, shape=cfg.image_size, num_classes=cfg.num_classes)
    image = np.repeat(min_max_standardize(ph.image)[None], cfg.image_channels, axis=0).astype(np.float32)
    return CalibrationVolume(f"phantom-{seed}", image, ph.label.astype(np.uint8))


def load_volumes(
    source: str | Path, cfg: ModelConfig, *, max_volumes: int, holdout: int
) -> tuple[list[CalibrationVolume], list[CalibrationVolume]]:
    """(calibration volumes, held-out volumes); never the same volume in both.

    A folder: files sorted by name, the last `holdout` held out, the first `max_volumes` of the
    rest used for calibration. "phantoms": fresh phantoms from disjoint seed ranges.
    """
    if max_volumes < 1 or holdout < 1:
        raise ValueError(f"need at least 1 calibration and 1 held-out volume (got {max_volumes} and {holdout})")
    if str(source) == PHANTOMS:
        calib = [_phantom(cfg, CALIBRATION_SEED0 + i) for i in range(max_volumes)]
        held = [_phantom(cfg, HOLDOUT_SEED0 + i) for i in range(holdout)]
        return calib, held
    files = _nifti_files(Path(source))
    if len(files) < 2:
        raise InputError(
            f"{source}: {len(files)} volume(s); calibration needs at least 2 "
            "(one is held out to measure the INT8 error)"
        )
    holdout = min(holdout, len(files) // 2)
    held_files, calib_files = files[len(files) - holdout :], files[: len(files) - holdout][:max_volumes]

    def load(path: Path) -> CalibrationVolume:
        return CalibrationVolume(stem(path), prepare(path, cfg).image, _label_for(path, cfg))

    return [load(p) for p in calib_files], [load(p) for p in held_files]


@dataclass
class Trajectories:
    """Inputs of every graph along the FP32 pipeline, one feed (batch 1) per call, plus its result."""

    feeds: dict[str, list[Feed]] = field(default_factory=dict)
    labels: list[np.ndarray] = field(default_factory=list)  # FP32 labels per volume (*grid)
    timesteps: list[float] = field(default_factory=list)  # t of every denoise_step call

    def add(self, graph: str, feed: Feed) -> None:
        self.feeds.setdefault(graph, []).append(feed)


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


Runner = Callable[[str, Feed], "np.ndarray | None"]


def walk(bundle: Bundle, volumes: Iterable[CalibrationVolume], run: Runner) -> list[float]:
    """The bundle's FP32 pipeline on each volume, one volume at a time, every graph call made
    through `run(graph, feed)` (which returns the first output, or None for a graph it skips: the
    raw denoiser and the probability decoder are called beside the pipeline, for their inputs).
    Returns the t of every denoise_step call."""
    cfg, steps = bundle.config, bundle.steps
    table = bundle.table_array()  # the bundle's own sampler rows, execution order
    timesteps: list[float] = []

    def needed(graph: str, feed: Feed) -> np.ndarray:
        out = run(graph, feed)
        assert out is not None, f"{graph} is part of the pipeline"
        return out

    for i, volume in enumerate(volumes):
        z_init, noise = draw_noise([SAMPLING_SEED + i], steps, cfg.latent_shape)
        z_image = needed("encoder", {"image": volume.image[None]})
        z = z_init
        for k in range(steps):
            coeffs = table[k][None]
            feed = {"z": z, "z_image": z_image, "coeffs": coeffs, "noise": noise[k]}
            run("denoiser", {"z": z, "z_image": z_image, "t": coeffs[:, 0].copy()})
            timesteps.append(float(coeffs[0, 0]))
            z = needed("denoise_step", feed)
        run("decoder", {"z": z})
        needed("decoder_argmax", {"z": z})
    return timesteps


def collect(bundle: Bundle, volumes: Sequence[CalibrationVolume], *, threads: int | None = None) -> Trajectories:
    """Run the bundle's pipeline (ORT CPU) on each volume and record every graph's inputs."""
    pipeline = ("encoder", "denoise_step", "decoder_argmax")
    sessions = {name: session(bundle.graph_path(name), threads) for name in pipeline}
    out = Trajectories()

    def record(graph: str, feed: Feed) -> np.ndarray | None:
        out.add(graph, feed)
        if graph not in sessions:
            return None
        result = sessions[graph].run(None, feed)[0]
        if graph == "decoder_argmax":
            out.labels.append(result[0])
        return result

    out.timesteps = walk(bundle, volumes, record)
    return out


def batches(feeds: Sequence[Feed], max_bytes: int = 64 << 20) -> list[Feed]:
    """Concatenate batch-1 feeds along the batch axis into batches of at most ~max_bytes."""
    if not feeds:
        return []
    per_sample = sum(a.nbytes for a in feeds[0].values())
    size = max(1, min(len(feeds), max_bytes // max(per_sample, 1)))
    out = []
    for start in range(0, len(feeds), size):
        chunk = feeds[start : start + size]
        out.append({name: np.concatenate([f[name] for f in chunk], axis=0) for name in chunk[0]})
    return out


class FeedReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over batched feeds, with the `set_range` and `__len__`
    that quantize_static's strided collection uses (one batch per collect: bounded memory)."""

    def __init__(self, feeds: Sequence[Feed]):
        self.feeds = list(feeds)
        self._range = (0, len(self.feeds))
        self._iter: Iterator[Feed] = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, end_index)
        self._iter = iter(self.feeds[start_index:end_index])

    def get_next(self) -> Feed | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds[self._range[0] : self._range[1]])
