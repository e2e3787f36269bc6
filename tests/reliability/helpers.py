"""Helpers for the reliability tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from ldseg.data.phantoms import make_phantom, write_phantom_nifti

# Off-grid model-order shapes (the demo grid is 32x64x64): every run resamples both ways.
PHANTOM_SHAPES = ((20, 36, 40), (24, 40, 36), (16, 48, 40), (28, 32, 44))


def write_phantoms(folder: Path, count: int, truth_dir: Path) -> list[Path]:
    """`count` small phantom volumes p0.nii.gz ... (shapes cycle through PHANTOM_SHAPES)."""
    folder.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"p{seed}.nii.gz"
        phantom = make_phantom(seed, PHANTOM_SHAPES[seed % len(PHANTOM_SHAPES)])
        write_phantom_nifti(phantom, path, truth_dir / f"p{seed}_truth.nii.gz", overwrite=False)
        paths.append(path)
    return paths


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]
