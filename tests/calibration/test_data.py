"""Calibration data: volumes split without overlap, and every graph's inputs along the real
FP32 trajectory, at every sampler step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldseg.calibration.data import (
    CALIBRATION_SEED0,
    FeedReader,
    batches,
    collect,
    load_volumes,
    session,
)
from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.errors import InputError
from ldseg.runtime.artifacts.bundle import load_bundle


def test_phantom_split_is_disjoint_and_deterministic(fp32_bundle: Path) -> None:
    cfg = load_bundle(fp32_bundle).config
    calib, held = load_volumes("phantoms", cfg, max_volumes=3, holdout=2)
    assert [v.name for v in calib] == [f"phantom-{CALIBRATION_SEED0 + i}" for i in range(3)]
    assert [v.name for v in held] == ["phantom-0", "phantom-1"]
    assert calib[0].image.shape == cfg.image_shape and calib[0].image.dtype == np.float32
    assert calib[0].label is not None and calib[0].label.shape == cfg.image_size
    again, _ = load_volumes("phantoms", cfg, max_volumes=1, holdout=1)
    np.testing.assert_array_equal(again[0].image, calib[0].image)


def _write_volumes(folder: Path, count: int, with_labels: bool) -> None:
    for seed in range(count):
        ph = make_phantom(seed, shape=(32, 64, 64))
        images = folder / "images" if with_labels else folder
        images.mkdir(parents=True, exist_ok=True)
        label_dir = folder / ("labels" if with_labels else "unused")
        label_dir.mkdir(exist_ok=True)
        write_phantom_nifti(ph, images / f"case{seed}.nii.gz", label_dir / f"case{seed}.nii.gz", overwrite=False)


def test_folder_split_holds_out_the_last_files(fp32_bundle: Path, tmp_path: Path) -> None:
    cfg = load_bundle(fp32_bundle).config
    _write_volumes(tmp_path / "data", 4, with_labels=True)
    calib, held = load_volumes(tmp_path / "data", cfg, max_volumes=2, holdout=1)
    assert [v.name for v in calib] == ["case0", "case1"] and [v.name for v in held] == ["case3"]
    assert held[0].label is not None  # DIR/labels/<name>.nii.gz found beside DIR/images
    flat = tmp_path / "flat"
    _write_volumes(flat, 2, with_labels=False)
    calib, held = load_volumes(flat, cfg, max_volumes=8, holdout=2)  # 2 files: 1 + 1
    assert [v.name for v in calib] == ["case0"] and [v.name for v in held] == ["case1"] and held[0].label is None


def test_unusable_data_is_an_input_error(fp32_bundle: Path, tmp_path: Path) -> None:
    cfg = load_bundle(fp32_bundle).config
    with pytest.raises(InputError, match="no NIfTI"):
        load_volumes(tmp_path, cfg, max_volumes=2, holdout=1)
    _write_volumes(tmp_path / "one", 1, with_labels=False)
    with pytest.raises(InputError, match="at least 2"):
        load_volumes(tmp_path / "one", cfg, max_volumes=2, holdout=1)
    with pytest.raises(ValueError):
        load_volumes("phantoms", cfg, max_volumes=0, holdout=1)


def test_collection_covers_every_timestep_of_the_trajectory(fp32_bundle: Path) -> None:
    bundle = load_bundle(fp32_bundle)
    calib, _ = load_volumes("phantoms", bundle.config, max_volumes=2, holdout=1)
    traj = collect(bundle, calib, threads=2)
    steps, table = bundle.steps, bundle.table_array()
    feeds = traj.feeds["denoise_step"]
    assert len(feeds) == 2 * steps and len(traj.feeds["encoder"]) == 2 and len(traj.feeds["decoder"]) == 2
    for v in range(2):
        rows = np.concatenate([f["coeffs"] for f in feeds[v * steps : (v + 1) * steps]])
        np.testing.assert_array_equal(rows, table)  # every row of the sampler, in execution order
    assert traj.timesteps == list(table[:, 0]) * 2
    # It is the real trajectory: step k's input is step k-1's output, the decoder reads the last.
    step = session(bundle.graph_path("denoise_step"), threads=2)
    for k in range(1, steps):
        (z_next,) = step.run(None, feeds[k - 1])
        np.testing.assert_array_equal(z_next, feeds[k]["z"])
    (z_last,) = step.run(None, feeds[steps - 1])
    np.testing.assert_array_equal(z_last, traj.feeds["decoder"][0]["z"])
    assert traj.labels[0].shape == bundle.config.image_size and traj.labels[0].dtype == np.uint8


def test_batches_and_reader() -> None:
    feeds = [{"x": np.full((1, 3), i, np.float32)} for i in range(5)]
    grouped = batches(feeds, max_bytes=24)  # 12 bytes per sample -> pairs
    assert [b["x"].shape[0] for b in grouped] == [2, 2, 1]
    reader = FeedReader(grouped)
    assert len(reader) == 3
    reader.set_range(1, 3)
    assert reader.get_next()["x"][0, 0] == 2 and reader.get_next()["x"][0, 0] == 4 and reader.get_next() is None
