"""`ldseg-run case.nii.gz --checkpoint my.safetensors` end to end: the first run exports a validated
bundle into the cache (LDSEG_CACHE), the second runs ONNX Runtime from it and agrees with --backend
torch. The checkpoint is the demo model saved as a user's own (tests.helpers.user_checkpoint): the
demo itself ships its bundle and never exports. One real export for the module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ldseg
from ldseg import api
from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.runtime.artifacts.cache import BUNDLES
from ldseg.runtime.artifacts.cache_listing import list_entries
from tests.helpers import user_checkpoint
from tests.runtime.artifacts.cache_fakes import Notes

pytestmark = pytest.mark.slow  # one real export of a demo-sized model
BIN = Path(sys.executable).parent
AGREEMENT = 0.999  # FP32 bundle backends vs PyTorch, fraction of identical voxels
CPU_FIRST = "openvino"  # auto's first CPU candidate for a bundle (issue 19: measured fastest there)
WARNING = "synthetic phantoms only"


def ldseg_run(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LDSEG_CACHE": str(cache), "COLUMNS": "10000"}
    return subprocess.run([str(BIN / "ldseg-run"), *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("case")
    phantom = make_phantom(700, (30, 60, 70))  # unseen seed, not the model's grid
    write_phantom_nifti(phantom, folder / "case.nii.gz", folder / "truth.nii.gz", overwrite=False)
    return folder / "case.nii.gz"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return user_checkpoint(tmp_path_factory.mktemp("user") / "mine.safetensors")


@pytest.fixture(scope="module")
def runs(
    case: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("run")
    cache = root / "cache"
    mine = str(checkpoint)
    first = ldseg_run(cache, str(case), "--checkpoint", mine, "-o", str(root / "first"))
    second = ldseg_run(cache, str(case), "--checkpoint", mine, "-o", str(root / "second"))
    reference = ldseg_run(cache, str(case), "--checkpoint", mine, "--backend", "torch", "-o", str(root / "torch"))
    return {"first": first, "second": second, "torch": reference, "root": root}  # type: ignore[dict-item]


def test_first_run_exports_into_the_cache_and_says_so_once(runs) -> None:  # type: ignore[no-untyped-def]
    first = runs["first"]
    assert first.returncode == 0, first.stderr
    cache = runs["root"] / "cache"
    [entry] = [e for e in list_entries(cache) if e.kind == BUNDLES]
    assert first.stderr.count("first use: exporting the fp32 ONNX bundle of demo") == 1  # the preset's name
    assert str(entry.path) in first.stderr
    assert f"backend: {CPU_FIRST} on cpu" in first.stderr


def test_second_run_is_a_bundle_backend_from_the_cache_and_agrees_with_torch(runs) -> None:  # type: ignore[no-untyped-def]
    second, reference = runs["second"], runs["torch"]
    assert second.returncode == 0 and reference.returncode == 0, second.stderr + reference.stderr
    assert "first use" not in second.stderr and "cached: fp32 ONNX bundle" in second.stderr
    assert f"backend: {CPU_FIRST} on cpu" in second.stderr and "backend: torch" in reference.stderr
    ours = np.asarray(nib.load(runs["root"] / "second" / "case_seg.nii.gz").dataobj)
    ref = np.asarray(nib.load(runs["root"] / "torch" / "case_seg.nii.gz").dataobj)
    assert len(np.unique(ref)) >= 2, "the reference must segment several classes for agreement to mean anything"
    assert (ours == ref).mean() >= AGREEMENT, (ours == ref).mean()


def test_the_demo_model_runs_its_shipped_bundle_and_warns_before_segmenting_a_user_file(
    case: Path, tmp_path: Path
) -> None:
    run = ldseg_run(tmp_path / "cache", str(case), "--checkpoint", "demo", "-o", str(tmp_path / "seg"))
    assert run.returncode == 0, run.stderr
    assert "first use" not in run.stderr and "shipped: fp32 ONNX bundle of demo" in run.stderr
    assert list_entries(tmp_path / "cache") == []  # nothing exported, nothing cached
    lines = run.stderr.splitlines()
    [warning] = [i for i, line in enumerate(lines) if WARNING in line]
    assert "use --checkpoint" in lines[warning].lower()
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("segmenting")), run.stderr
    demo = ldseg_run(tmp_path / "cache", "--demo", "--backend", "torch", "--steps", "2", "-o", str(tmp_path))
    assert demo.returncode == 0, demo.stderr
    assert WARNING not in demo.stderr  # --demo says what it is already


def test_backend_onnxruntime_with_a_checkpoint_uses_the_cache(runs, case: Path, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    notes = Notes()
    with ldseg.Segmenter(str(checkpoint), backend="onnxruntime", cache=runs["root"] / "cache", reporter=notes) as seg:
        assert seg.backend.name == "onnxruntime" and seg.why.startswith("asked for")
        assert seg.artifacts is not None and [hit.built for hit in seg.artifacts.hits] == [False]
        [result] = seg.segment(case)
    ref = np.asarray(nib.load(runs["root"] / "torch" / "case_seg.nii.gz").dataobj)
    assert (result.labels == ref).mean() >= AGREEMENT


def test_no_cache_exports_into_a_temporary_folder_for_this_run_only(
    runs,
    case: Path,
    checkpoint: Path,
    monkeypatch,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    [entry] = [e for e in list_entries(runs["root"] / "cache") if e.kind == BUNDLES]
    exported: list[Path] = []

    def copy_the_cached_export(model, target, key, progress):  # type: ignore[no-untyped-def]
        exported.append(target)  # the real export ran in the fixture; copying it keeps this test fast
        shutil.copytree(entry.path, target)

    monkeypatch.setattr(api, "build_bundle", copy_the_cached_export)
    monkeypatch.setenv("LDSEG_CACHE", str(tmp_path / "user-cache"))
    with ldseg.Segmenter(str(checkpoint), cache=False, warn_demo=False, reporter=Notes()) as seg:
        assert seg.backend.name == CPU_FIRST
        [folder] = exported
        assert folder.is_dir() and "ldseg-nocache-" in str(folder)
    assert not folder.exists() and not (tmp_path / "user-cache").exists()


def test_a_disk_full_while_exporting_leaves_no_entry_and_exits_5(case: Path, checkpoint: Path, tmp_path: Path) -> None:
    from tests.reliability.test_interrupt_and_disk_full import _tiny_tmpfs

    with _tiny_tmpfs(tmp_path / "disk", size="3m") as disk:  # the demo bundle needs 7.4 MB
        full = ldseg_run(disk / "cache", str(case), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "out"))
        assert full.returncode == 5, full.stderr
        assert "no space left on device" in full.stderr and "Traceback" not in full.stderr
        leftovers = [p.name for p in (disk / "cache" / BUNDLES).iterdir() if not p.name.endswith(".lock")]
        assert leftovers == [], "a half entry or a staged folder was left"
        assert list_entries(disk / "cache") == []
