"""One volume's whole path around the model, stage by stage (issue 30's `pipeline` row): read the file,
preprocess it to the model grid, run the model (K = 1, as `ldseg-run`), bring the labels back to the
input grid, write them. With `--data` holding 3D volumes, `ldseg-bench` adds this record to every row,
for the first volume, with the backend's volume ops (its device: `Backend.volume_ops()`) where it has
them and the CPU path (numpy/scipy) otherwise, so a GPU row shows what the model's own time leaves
out.

Each stage is timed alone with perf_counter, `repeat` times after one untimed pass (and the model's
warm-up up to its capturing request), and waits for the device before it returns. The model keeps
its result on the device where the volume ops are the backend's own (`sample(resident=True)`, as
`ldseg-run` does), so postprocess starts from there; on a GPU the volume's upload is inside
preprocess and the labels' download inside postprocess (pinned buffers, host arrays back).
`over_model` is the sum of the stage medians other than read, over the model's: issue 30's "warm
per-volume time <= 1.3x the model".
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.bench.stats import summarize
from ldseg.io.formats import format_of
from ldseg.io.preprocess import image_to_model_grid
from ldseg.model.config import ModelConfig
from ldseg.runs.volumes import Prepared, to_input_grid
from ldseg.runtime.backend import Backend, make_inputs

STAGES = ("read", "preprocess", "model", "postprocess", "write")


def pipeline_record(
    backend: Backend[Any, Any],
    cfg: ModelConfig,
    path: Path,
    *,
    steps: int,
    sampler: str | None,
    seed: int,
    repeat: int,
    model_warmup: int,
) -> dict[str, Any]:
    """The stage times (ms summaries) of one volume at `path` through `backend`."""
    ops = backend.volume_ops()
    volume_format = format_of(path)
    volume = volume_format.read(path)
    grid = cfg.image_size

    def preprocess() -> np.ndarray:
        image = ops.to_model_grid(volume.array, grid) if ops is not None else image_to_model_grid(volume.array, grid)
        return np.asarray(image, np.float32)[None]

    prepared = Prepared(path, preprocess(), volume)
    inputs = make_inputs(cfg, prepared.image[None], [seed], steps, sampler)
    resident = ops is not None
    mean = backend.sample(inputs, resident=resident).mean

    def model() -> None:
        nonlocal mean
        mean = backend.sample(inputs, resident=resident).mean
        backend.synchronize()

    labels = to_input_grid(prepared, mean, ops)
    with tempfile.TemporaryDirectory(prefix="ldseg-bench-") as folder:
        target = Path(folder) / f"seg{''.join(path.suffixes) or '.nii.gz'}"

        def write() -> None:
            volume_format.write(target, labels, volume, overwrite=True, dtype=np.uint8)

        stages: dict[str, Callable[[], object]] = {
            "read": lambda: volume_format.read(path),
            "preprocess": preprocess,
            "model": model,
            "postprocess": lambda: to_input_grid(prepared, mean, ops),
            "write": write,
        }
        for _ in range(max(0, model_warmup - 1)):  # one model run above already
            model()
        for stage in stages.values():
            stage()
        samples: dict[str, list[float]] = {name: [] for name in STAGES}
        for _ in range(repeat):
            for name in STAGES:
                start = time.perf_counter()
                stages[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: summarize(samples[name]).to_dict() for name in STAGES}
    around = sum(float(ms[name]["p50"]) for name in STAGES if name != "read")
    return {
        "file": path.name,
        "input_shape": list(volume.array.shape),
        "volume_ops": "cpu (numpy/scipy)" if ops is None else f"{type(ops).__name__} on {backend.device}",
        "ms": ms,
        "over_model": around / max(float(ms["model"]["p50"]), 1e-9),
    }
