"""ldseg.api: ldseg.segment and ldseg.Segmenter (PyTorch backend here; the cached ONNX Runtime path is
in tests/runtime/artifacts/test_cache_cli.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import ldseg
from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.errors import InputError
from ldseg.model import checkpoint as checkpoint_module
from ldseg.model.checkpoint import load_checkpoint, save_checkpoint
from ldseg.runtime.artifacts.source import demo_checkpoint_path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder, truth = tmp_path_factory.mktemp("scans"), tmp_path_factory.mktemp("truth")
    paths = []
    for seed in (600, 601):  # phantom seeds the demo model never saw, on a grid other than the model's
        phantom = make_phantom(seed, (30, 60, 70))
        write_phantom_nifti(phantom, folder / f"s{seed}.nii.gz", truth / f"s{seed}.nii.gz", overwrite=False)
        paths.append(folder / f"s{seed}.nii.gz")
    return paths


def test_segment_returns_labels_on_the_input_grid_with_its_geometry(scans: list[Path]) -> None:
    with pytest.warns(UserWarning, match="synthetic phantoms only"):
        [result] = ldseg.segment(scans[0], backend="torch", steps=5)  # type: ignore[misc]
    image = nib.load(scans[0])
    assert result.path == scans[0] and result.labels.shape == image.shape == (70, 60, 30)
    assert result.labels.dtype == np.uint8 and len(np.unique(result.labels)) >= 2  # a trained model
    np.testing.assert_array_equal(result.affine, image.affine)
    assert result.maps == {}


def test_segmenter_loads_once_and_keeps_the_backend_warm(scans: list[Path], monkeypatch) -> None:
    loads: list[object] = []
    real = checkpoint_module.load_checkpoint  # what artifacts.source.load_model calls (imported on use)

    def counting(path):  # type: ignore[no-untyped-def]
        loads.append(path)
        return real(path)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", counting)
    with ldseg.Segmenter(backend="torch", steps=5, samples=2, warn_demo=False) as seg:
        backend = seg.backend
        first = seg.segment(scans)
        again = seg.segment(scans[0], probabilities=True)
        assert seg.backend is backend and len(loads) == 1
    assert [r.path for r in first] == scans
    np.testing.assert_array_equal(first[0].labels, again[0].labels)  # same seed, same result
    assert set(first[0].maps) == {"confidence", "entropy"}
    assert {"prob0", "prob1", "prob2"} <= set(again[0].maps)


def test_write_gives_the_files_ldseg_run_writes(scans: list[Path], tmp_path: Path) -> None:
    with ldseg.Segmenter("demo", backend="torch", steps=5, warn_demo=False) as seg:
        [result] = seg.segment(scans[0])
        summary = seg.write(scans[0].parent, tmp_path / "out")
        again = seg.write(scans[0], tmp_path / "out")  # the run manifest records it as done: resumed
        assert again.resumed == [scans[0]] and not again.written and not again.failures
        # Without the manifest's record it is an existing file: never overwritten without overwrite.
        assert seg.write(scans[0], tmp_path / "out", manifest=False).failures
    assert summary.written == [tmp_path / "out" / "s600_seg.nii.gz", tmp_path / "out" / "s601_seg.nii.gz"]
    written = np.asarray(nib.load(summary.written[0]).dataobj)
    np.testing.assert_array_equal(written, result.labels)


def test_the_demo_warning_is_once_and_only_for_the_demo_model(scans: list[Path], tmp_path: Path) -> None:
    model = load_checkpoint(demo_checkpoint_path())
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # another checkpoint (another content hash), still trained
    other = tmp_path / "other.safetensors"
    save_checkpoint(model, other, overwrite=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ldseg.Segmenter(backend="torch", steps=2) as seg:
            assert seg.is_demo
            seg.segment(scans[0])
            seg.segment(scans[1])
        with ldseg.Segmenter(other, backend="torch", steps=2) as seg:
            assert not seg.is_demo
            seg.segment(scans[0])
        with ldseg.Segmenter(backend="torch", steps=2, warn_demo=False) as seg:
            seg.segment(scans[0])
    assert [str(w.message) for w in caught] == [ldseg.api.DEMO_WARNING]


def test_a_missing_input_is_an_input_error_naming_it(tmp_path: Path) -> None:
    with ldseg.Segmenter(backend="torch", warn_demo=False) as seg, pytest.raises(InputError, match="nope.nii.gz"):
        seg.segment(tmp_path / "nope.nii.gz")
