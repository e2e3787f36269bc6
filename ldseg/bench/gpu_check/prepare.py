"""gpu_check's CPU side: the folder the GPU machine runs from (bundles, phantoms, wheels)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ldseg.bench.gpu_check.report import git_head, now

PREPARED = Path("work/gpu-check")
PHANTOM_SEEDS = (0, 1, 2, 3)  # never seen in training (README: training seeds >= 10000)
BUNDLES = {"fp32": "demo-fp32", "fp16": "demo-fp16", "int8": "demo-int8"}
TARGET_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "int8": 0.98}  # fraction of voxels equal to the reference
# Pure (or abi3) wheels the GPU machine may lack; the shell script installs only the missing ones.
WHEELS = (
    "nibabel",
    "platformdirs",  # the artifact cache (a checkpoint's bundle on first use); not in the GPU image
    "packaging",
    "importlib_resources",
    "typing_extensions",
    "safetensors",
    "psutil",
    "typer",
    "click",
    "rich",
    "shellingham",
    "markdown-it-py",
    "mdurl",
    "pygments",
)


def no_gpu_reason() -> str | None:
    """None when some route sees a GPU; else why not, per route (PyTorch, cuda-python)."""
    from ldseg.runtime.backends.tensorrt.cuda import cuda_runtime_problem
    from ldseg.runtime.select import torch_cuda_problem

    torch_problem, runtime_problem = torch_cuda_problem(0), cuda_runtime_problem(0)
    if torch_problem is None or runtime_problem is None:
        return None
    return f"PyTorch: {torch_problem}; cuda-python: {runtime_problem}"


# --------------------------------------------------------------------------- prepare (CPU)


def prepare(folder: Path, wheels: bool = True, log: Callable[[str], None] = print) -> Path:
    """Export the bundles, write the phantoms and fetch the wheels into `folder` (re-runnable)."""
    from ldseg.bench.sources import load_images
    from ldseg.calibration import calibrate
    from ldseg.data.phantoms import make_phantom
    from ldseg.export.exporter import export_bundle
    from ldseg.model.config import get_preset
    from ldseg.runtime.artifacts.source import demo_checkpoint_path

    folder.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("demo")
    truth = [make_phantom(seed, cfg.image_size, cfg.num_classes).label for seed in PHANTOM_SEEDS]
    images, _, _ = load_images(
        cfg, len(PHANTOM_SEEDS), None, PHANTOM_SEEDS[0]
    )  # phantoms, preprocessed as the bench does
    np.savez_compressed(
        folder / "phantoms.npz",
        seeds=np.array(PHANTOM_SEEDS),
        images=images.astype(np.float32),
        truth=np.stack(truth).astype(np.uint8),
    )
    graphs = ("encoder", "denoise_step", "decoder", "decoder_argmax")
    for precision in ("fp32", "fp16"):
        log(f"exporting the {precision} bundle")
        export_bundle(
            demo_checkpoint_path(), folder / BUNDLES[precision], precision=precision, graphs=graphs, overwrite=True
        )
    log("calibrating the int8 bundle on phantoms")
    calibrate(folder / BUNDLES["fp32"], "phantoms", folder / BUNDLES["int8"], overwrite=True)
    if wheels:
        log("downloading wheels")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(folder / "wheels"),
                *WHEELS,
            ],
            check=True,
        )
    info = {
        "created": now(),
        "git": git_head(),
        "python": platform.python_version(),
        "bundles": BUNDLES,
        "phantom_seeds": list(PHANTOM_SEEDS),
        "wheels": sorted(p.name for p in (folder / "wheels").glob("*.whl")) if wheels else [],
    }
    (folder / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"prepared {folder}")
    return folder
