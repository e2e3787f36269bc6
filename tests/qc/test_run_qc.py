"""ldseg-run --preview / --qc / --labels / --report end to end, through the console script."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.model.checkpoint import save_checkpoint
from ldseg.model.config import PRESETS
from ldseg.model.network import COMPONENTS, LDSeg
from tests.helpers import output_names

BIN = Path(sys.executable).parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    tool, *rest = args
    if tool == "ldseg-run" and "--backend" not in rest:
        rest += ["--backend", "torch"]  # these tests are about files: no ONNX export into the artifact cache
    return subprocess.run([str(BIN / tool), *rest], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """images/p{1,2}.nii.gz (off the model grid) and labels/ with the same names."""
    root = tmp_path_factory.mktemp("qc")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for seed in (1, 2):
        phantom = make_phantom(seed, (30, 60, 70))
        write_phantom_nifti(
            phantom, root / "images" / f"p{seed}.nii.gz", root / "labels" / f"p{seed}.nii.gz", overwrite=False
        )
    return root


def test_report_with_labels_on_the_demo_model(cases, tmp_path):
    out = tmp_path / "out"
    args = (
        "ldseg-run",
        str(cases / "images"),
        "-o",
        str(out),
        "--steps",
        "5",
        "--samples",
        "2",
        "--report",
        "--labels",
        str(cases / "labels"),
    )
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    for name in ("p1", "p2"):
        assert (out / f"{name}_preview.png").read_bytes()[:4] == b"\x89PNG"
        qc = json.loads((out / f"{name}_qc.json").read_text())
        assert qc["samples"] == 2 and qc["label"].endswith(f"labels/{name}.nii.gz")
        seg = np.asarray(nib.load(out / f"{name}_seg.nii.gz").dataobj)
        for c in ("1", "2"):
            assert qc["classes"][c]["dice"] > 0.8, qc  # the bundled demo model is trained
            # sizes count the written segmentation; phantom voxels are 1 mm^3
            assert qc["classes"][c]["voxels"] == qc["classes"][c]["volume_mm3"] == (seg == int(c)).sum()
        assert 0 <= qc["mean_structure_entropy"] < 0.2 and 0 <= qc["low_confidence_fraction"] < 0.2
        assert f"{name}: {PRESETS['demo'].names[1]} " in result.stderr  # the console summary line
    html = (out / "report.html").read_text()
    assert "p1" in html and "p2" in html and html.count("data:image/png;base64,") == 2
    # Asked again without --overwrite: refused before any compute, nothing changed.
    before = (out / "report.html").read_bytes()
    again = cli(*args)
    assert again.returncode == 5 and "report.html: exists (use --overwrite)" in again.stderr
    assert (out / "report.html").read_bytes() == before


def test_bad_reference_label_fails_that_volume_only(cases, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "p1.nii.gz").write_bytes((cases / "labels" / "p1.nii.gz").read_bytes())
    write_phantom_nifti(make_phantom(2, (30, 60, 64)), tmp_path / "x.nii.gz", labels / "p2.nii.gz", overwrite=False)
    out = tmp_path / "out"
    result = cli("ldseg-run", str(cases / "images"), "-o", str(out), "--steps", "2", "--labels", str(labels))
    assert result.returncode == 3
    assert (
        f"{labels / 'p2.nii.gz'}: label of shape (64, 60, 30), its image p2.nii.gz has shape (70, 60, 30)"
        in " ".join(result.stderr.split())
    )
    assert sorted(p.name for p in out.glob("p*")) == ["p1_qc.json", "p1_seg.nii.gz"]


def test_plain_run_imports_no_qc_code(cases, tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from ldseg.runtime.select import Source, select_backend\n"
        "from ldseg.runs.local import run_files\n"
        "from ldseg.runs.types import RunOptions\n"
        "s = select_backend(Source('demo', None, None), 'torch', 'cpu')\n"
        f"r = run_files([Path({str(cases / 'images' / 'p1.nii.gz')!r})], Path({str(tmp_path)!r}), s.backend, s.config,"
        " RunOptions(steps=1, samples=2))\n"
        "assert r.volumes == 1 and not r.records\n"
        "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'jinja2', 'ldseg.qc'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not list(tmp_path.glob("*_preview.png")) and not list(tmp_path.glob("*_qc.json"))


@pytest.fixture(scope="module")
def tiny2d_checkpoint(tmp_path_factory) -> Path:
    """A small 2D model (random weights: plumbing only, not accuracy)."""
    cfg = dataclasses.replace(
        PRESETS["demo"],
        preset="tiny2d",
        spatial_dims=2,
        image_channels=3,
        image_size=(64, 64),
        num_classes=2,
        image_grouped_conv=False,
        class_names=("background", "gland"),
        class_colors=("#000000", "#e6194b"),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt2d") / "tiny2d.safetensors"
    save_checkpoint(LDSeg(cfg, trained={name: True for name in COMPONENTS}).eval(), path, overwrite=False)
    return path


def test_preview_and_report_for_2d_images(tiny2d_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, size=(50, 70, 3), dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "out"
    result = cli(
        "ldseg-run",
        str(images),
        "-o",
        str(out),
        "--checkpoint",
        str(tiny2d_checkpoint),
        "--steps",
        "2",
        "--samples",
        "2",
        "--report",
    )
    assert result.returncode == 0, result.stderr
    for name in ("a", "b"):
        with Image.open(out / f"{name}_preview.png") as im:
            assert im.format == "PNG" and im.size[0] > im.size[1]  # image, overlay, entropy side by side
        qc = json.loads((out / f"{name}_qc.json").read_text())
        assert qc["shape"] == [50, 70] and qc["classes"]["1"]["volume_mm3"] is None
        assert sum(c["voxels"] for c in qc["classes"].values()) <= 50 * 70
    assert "pixels" in (out / "report.html").read_text()


def test_resumed_run_reports_skipped_volumes_from_their_sidecars(cases, tmp_path):
    out = tmp_path / "out"
    first = cli("ldseg-run", str(cases / "images" / "p1.nii.gz"), "-o", str(out), "--steps", "2", "--preview", "--qc")
    assert first.returncode == 0, first.stderr
    sidecar = (out / "p1_qc.json").read_bytes()
    resumed = cli("ldseg-run", str(cases / "images"), "-o", str(out), "--steps", "2", "--report", "--skip-existing")
    assert resumed.returncode == 0, resumed.stderr
    assert "already done: 1 (manifest)" in resumed.stderr and (out / "p1_qc.json").read_bytes() == sidecar
    html = (out / "report.html").read_text()
    assert "<b>p1</b>" in html and "<b>p2</b>" in html and html.count("data:image/png;base64,") == 2


def test_a_failed_preview_write_leaves_none_of_the_volumes_outputs(cases, tmp_path):
    out = tmp_path / "out"
    (out / "p1_preview.png").mkdir(parents=True)  # the preview cannot be written: the maps go too
    result = cli(
        "ldseg-run",
        str(cases / "images" / "p1.nii.gz"),
        "-o",
        str(out),
        "--steps",
        "1",
        "--preview",
        "--qc",
        "--overwrite",
    )
    assert result.returncode == 5 and "p1_preview.png: is a directory" in result.stderr
    assert output_names(out) == ["p1_preview.png"]
