"""The model on one prepared input: K samples through the backend, then the maps to write on the
input's grid (segmentation, and for K > 1 confidence and vote entropy; probabilities on request)."""

from __future__ import annotations

import numpy as np

from ldseg.model.config import ModelConfig
from ldseg.runs.outputs import output_suffixes, seg_needs_probabilities
from ldseg.runs.types import RunOptions, Segmentation
from ldseg.runs.volumes import Prepared, map_to_input_grid, to_input_grid
from ldseg.runtime.backend import Backend, make_inputs
from ldseg.runtime.samples import SampleResult
from ldseg.runtime.volume_ops import VolumeOps


def segment_prepared(
    prepared: Prepared, backend: Backend, cfg: ModelConfig, opts: RunOptions
) -> tuple[dict[str, tuple[np.ndarray, type]], dict[str, float]]:
    """Run one prepared input; returns {output suffix: (array on input grid, dtype)} and stage times."""
    result = segment(prepared, backend, cfg, opts)
    return result.outputs, result.stage_ms


def infer(
    image: np.ndarray, backend: Backend, cfg: ModelConfig, opts: RunOptions, *, resident: bool = False
) -> SampleResult:
    """The model on one prepared image (C, *grid), K samples (Backend.sample: one encoder run, the
    K chains as one batch, the decoder in memory-bounded chunks): the mean probabilities
    (num_classes, *grid), the K label votes (K, *grid) and the backend's stage times. resident: left
    on the device where the backend's volume ops will resample them (this process only)."""
    seeds = [opts.seed + k for k in range(opts.samples)]
    return backend.sample(make_inputs(cfg, image[None], seeds, opts.steps, opts.sampler), resident=resident)


def on_input_grid(
    prepared: Prepared, result: SampleResult, cfg: ModelConfig, opts: RunOptions, ops: VolumeOps | None = None
) -> Segmentation:
    """infer's result as the maps to write, on the input's grid (`ops`: resampled on the backend's
    device, ldseg/runtime/volume_ops.py; a result kept there is used where it is)."""
    mean = result.mean
    outputs: dict[str, tuple[np.ndarray, type]] = {"_seg": (to_input_grid(prepared, mean, ops), np.uint8)}
    if opts.samples > 1:
        outputs["_confidence"] = (map_to_input_grid(prepared, result.confidence(), ops), np.float32)
        outputs["_entropy"] = (map_to_input_grid(prepared, result.entropy(cfg.num_classes), ops), np.float32)
    if opts.save_probabilities or seg_needs_probabilities(opts):
        for c in range(cfg.num_classes):
            outputs[f"_prob{c}"] = (map_to_input_grid(prepared, mean[c], ops), np.float32)
    assert list(outputs) == output_suffixes(cfg, opts)  # run_files plans the file names from that list
    return Segmentation(outputs, result.stage_ms, result.votes, mean)


def segment(prepared: Prepared, backend: Backend, cfg: ModelConfig, opts: RunOptions) -> Segmentation:
    """segment_prepared, also keeping the K votes and mean probabilities (model grid) that QC counts on."""
    ops = backend.volume_ops()
    return on_input_grid(prepared, infer(prepared.image, backend, cfg, opts, resident=ops is not None), cfg, opts, ops)
