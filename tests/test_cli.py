"""End-to-end CLI tests through the real console scripts (exit codes and files on disk)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.metrics import dice_per_class
from ldseg.model.checkpoint import save_checkpoint
from ldseg.model.config import PRESETS
from ldseg.model.network import COMPONENTS, LDSeg
from ldseg.runtime.artifacts.source import demo_checkpoint_path
from tests.helpers import assert_several_classes, output_names, shared_or_skip

BIN = Path(sys.executable).parent


# File-handling tests pin --backend torch: a checkpoint under auto would export an ONNX bundle into the
# artifact cache first (tests/runtime/artifacts/test_cache_cli.py covers that path).
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    tool, *rest = args
    return subprocess.run([str(BIN / tool), *rest], capture_output=True, text=True, timeout=600)


def run_random(checkpoint: Path, *args: str, steps: str = "2") -> subprocess.CompletedProcess[str]:
    """ldseg-run with the random-weight checkpoint on the torch backend (no export), `steps` steps."""
    return cli("ldseg-run", *args, "--checkpoint", str(checkpoint), "--backend", "torch", "--steps", steps)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    """Demo-preset weights, random but flagged trained: exercises the plumbing, not the accuracy."""
    torch.manual_seed(0)
    model = LDSeg(PRESETS["demo"], trained={name: True for name in COMPONENTS}).eval()
    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    save_checkpoint(model, path, overwrite=False)
    return path


@pytest.fixture()
def phantom_dir(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in (1, 2):
        # Off-grid shape: the run must resample to the model grid and back.
        phantom = make_phantom(seed, (30, 60, 70))
        write_phantom_nifti(phantom, folder / f"p{seed}.nii.gz", tmp_path / f"p{seed}_truth.nii.gz", overwrite=False)
    return folder


def test_run_writes_label_on_the_input_grid(random_checkpoint, phantom_dir, tmp_path):
    result = run_random(random_checkpoint, str(phantom_dir / "p1.nii.gz"), "-o", str(tmp_path / "out"), steps="3")
    assert result.returncode == 0, result.stderr
    seg, image = nib.load(tmp_path / "out" / "p1_seg.nii.gz"), nib.load(phantom_dir / "p1.nii.gz")
    assert seg.shape == image.shape == (70, 60, 30)
    np.testing.assert_array_equal(seg.affine, image.affine)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}


def test_existing_output_is_kept_without_overwrite(random_checkpoint, phantom_dir, tmp_path):
    args = (
        "ldseg-run",
        str(phantom_dir / "p1.nii.gz"),
        "-o",
        str(tmp_path / "out"),
        "--checkpoint",
        str(random_checkpoint),
        "--backend",
        "torch",
        "--steps",
        "2",
    )
    assert cli(*args).returncode == 0
    target = tmp_path / "out" / "p1_seg.nii.gz"
    before = target.read_bytes()
    again = cli(*args)  # the same command: the run manifest says p1 is done, nothing is recomputed
    assert again.returncode == 0 and "already done: 1 (manifest)" in again.stderr
    other = cli(*args[:-1], "3")  # other settings (--steps 3): p1's file is not theirs, so it is refused
    assert other.returncode == 5 and "exists (use --overwrite, or --skip-existing to resume)" in other.stderr
    assert target.read_bytes() == before
    assert cli(*args, "--overwrite").returncode == 0
    assert output_names(target.parent) == ["p1_seg.nii.gz"], "no temp files left"


def test_skip_existing_resumes_a_folder_run(random_checkpoint, phantom_dir, tmp_path):
    out_dir = tmp_path / "out"
    common = ("-o", str(out_dir), "--checkpoint", str(random_checkpoint), "--backend", "torch", "--steps", "2")
    assert cli("ldseg-run", str(phantom_dir / "p1.nii.gz"), *common).returncode == 0
    first = (out_dir / "p1_seg.nii.gz").read_bytes()
    resumed = cli("ldseg-run", str(phantom_dir), *common, "--skip-existing")
    assert resumed.returncode == 0, resumed.stderr
    assert "already done: 1 (manifest)" in resumed.stderr  # the run manifest says p1 is done
    assert (out_dir / "p1_seg.nii.gz").read_bytes() == first
    assert output_names(out_dir) == ["p1_seg.nii.gz", "p2_seg.nii.gz"]
    # Asking for more maps than were written: p1's are incomplete, so it is not skipped but refused.
    partial = cli("ldseg-run", str(phantom_dir), *common, "--skip-existing", "--samples", "2")
    assert partial.returncode == 5 and "p1_seg.nii.gz: exists (use --overwrite)" in partial.stderr
    clash = cli("ldseg-run", str(phantom_dir), *common, "--skip-existing", "--overwrite")
    assert clash.returncode == 2 and "contradict" in clash.stderr


def test_folder_run_skips_a_bad_file_and_fails_at_the_end(random_checkpoint, phantom_dir, tmp_path):
    (phantom_dir / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    result = run_random(random_checkpoint, str(phantom_dir), "-o", str(tmp_path / "out"))
    assert result.returncode == 3
    assert "broken.nii.gz" in result.stderr and "1 of 3 input(s) failed" in result.stderr
    assert output_names(tmp_path / "out") == ["p1_seg.nii.gz", "p2_seg.nii.gz"]


def test_fail_fast_stops_at_the_first_bad_file(random_checkpoint, phantom_dir, tmp_path):
    (phantom_dir / "a_broken.nii.gz").write_bytes(b"nope")
    result = run_random(random_checkpoint, str(phantom_dir), "-o", str(tmp_path / "out"), "--fail-fast")
    assert result.returncode == 3
    assert output_names(tmp_path / "out") == []


def test_samples_write_uncertainty_maps(random_checkpoint, phantom_dir, tmp_path):
    result = run_random(
        random_checkpoint, str(phantom_dir / "p2.nii.gz"), "-o", str(tmp_path / "out"), "--samples", "3"
    )
    assert result.returncode == 0, result.stderr
    entropy = np.asarray(nib.load(tmp_path / "out" / "p2_entropy.nii.gz").dataobj)
    confidence = np.asarray(nib.load(tmp_path / "out" / "p2_confidence.nii.gz").dataobj)
    assert entropy.shape == confidence.shape == (70, 60, 30)
    assert entropy.min() >= 0 and entropy.max() <= 1 + 1e-6
    assert confidence.min() >= 1 / 3 - 1e-4 and confidence.max() <= 1 + 1e-6


def test_untrained_checkpoint_is_refused(tmp_path, phantom_dir):
    path = tmp_path / "untrained.safetensors"
    save_checkpoint(LDSeg(PRESETS["demo"]), path, overwrite=False)
    result = cli("ldseg-run", str(phantom_dir / "p1.nii.gz"), "-o", str(tmp_path / "out"), "--checkpoint", str(path))
    assert result.returncode == 4
    assert "no trained weights" in result.stderr and "Traceback" not in result.stderr


def test_missing_input_is_one_line_error(random_checkpoint, tmp_path):
    result = cli(
        "ldseg-run", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "out"), "--checkpoint", str(random_checkpoint)
    )
    assert result.returncode == 3 and "nope.nii.gz: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_checkpoint_is_refused(random_checkpoint, phantom_dir, tmp_path):
    data = bytearray(random_checkpoint.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    result = cli("ldseg-run", str(phantom_dir / "p1.nii.gz"), "-o", str(tmp_path / "out"), "--checkpoint", str(bad))
    assert result.returncode == 4 and "hash mismatch" in result.stderr


@pytest.mark.shared
@pytest.mark.slow
def test_import_keras_and_reconstruct_a_knee_case(tmp_path):
    weights = shared_or_skip("official-keras-weights")
    label = shared_or_skip("knee", "labels", "case1.nii.gz")
    image = shared_or_skip("knee", "images", "case1.nii.gz")
    checkpoint = tmp_path / "knee3d.safetensors"
    result = cli(
        "ldseg-export",
        "import-keras",
        "--preset",
        "knee3d",
        "-o",
        str(checkpoint),
        "--label-encoder",
        str(weights / "labelEncoder3D.hdf5"),
        "--label-decoder",
        str(weights / "labelDecoder3D.hdf5"),
        "--image-encoder",
        str(weights / "imageEncoder3D.hdf5"),
    )
    assert result.returncode == 0, result.stderr
    inspect = cli("ldseg-export", "inspect", str(checkpoint))
    assert '"denoiser": false' in inspect.stdout and '"preset": "knee3d"' in inspect.stdout
    refused = cli("ldseg-run", str(image), "-o", str(tmp_path / "seg"), "--checkpoint", str(checkpoint))
    assert refused.returncode == 4 and "denoiser" in refused.stderr
    result = cli("ldseg-run", "--checkpoint", str(checkpoint), "--reconstruct", str(label), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    written = nib.load(tmp_path / "out" / "case1_reconstruction.nii.gz")
    reference = nib.load(label)
    np.testing.assert_array_equal(written.affine, nib.load(image).affine)
    truth = np.asarray(reference.dataobj)
    assert_several_classes(truth, "knee case1 label")
    scores = dice_per_class(np.asarray(written.dataobj), truth, 3)
    assert min(scores.values()) >= 0.93, scores


@pytest.mark.slow
def test_export_onnx_then_run_the_bundle_like_the_checkpoint(phantom_dir, tmp_path):
    checkpoint = demo_checkpoint_path()  # trained: its labels hold several classes, so agreement can fail
    bundle = tmp_path / "bundle"
    result = cli("ldseg-export", "onnx", str(checkpoint), "-o", str(bundle))
    assert result.returncode == 0, result.stderr
    assert "FAIL" not in result.stdout and (bundle / "manifest.json").is_file()
    assert '"preset"' in cli("ldseg-export", "inspect", str(checkpoint)).stdout
    image = str(phantom_dir / "p1.nii.gz")
    by_bundle = cli("ldseg-run", image, "-o", str(tmp_path / "ort"), "--bundle", str(bundle), "--steps", "3")
    assert by_bundle.returncode == 0, by_bundle.stderr
    assert re.search(r"^backend: (openvino|onnxruntime) on cpu", by_bundle.stderr, re.M), by_bundle.stderr
    by_torch = cli(
        "ldseg-run",
        image,
        "-o",
        str(tmp_path / "torch"),
        "--checkpoint",
        str(checkpoint),
        "--backend",
        "torch",
        "--steps",
        "3",
    )
    assert by_torch.returncode == 0, by_torch.stderr
    ort_labels = np.asarray(nib.load(tmp_path / "ort" / "p1_seg.nii.gz").dataobj)
    torch_labels = np.asarray(nib.load(tmp_path / "torch" / "p1_seg.nii.gz").dataobj)
    assert_several_classes(torch_labels, "ldseg-run --checkpoint output")
    assert (ort_labels == torch_labels).mean() >= 0.999
    (bundle / "decoder.onnx").write_bytes((bundle / "decoder.onnx").read_bytes() + b"x")
    tampered = cli("ldseg-run", image, "-o", str(tmp_path / "t"), "--bundle", str(bundle))
    assert tampered.returncode == 4 and "decoder.onnx" in tampered.stderr
