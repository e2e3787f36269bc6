"""Cohort runs on the local engine: the run manifest, resume, leftovers of a killed run, array-job
sharding, and Dice from an input list's label column. (The Ray engine: tests/cli/test_run_ray.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.metrics import dice_per_class
from ldseg.runs.manifest import MANIFEST_NAME, RunManifest, RunRow
from tests.helpers import assert_several_classes

BIN = Path(sys.executable).parent
# The demo model on the torch backend: no export, a few steps; what is tested is the bookkeeping.
RUN = ("--backend", "torch", "--steps", "3", "--threads", "1")


def ldseg_run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUTF8": "1"}
    return subprocess.run([str(BIN / "ldseg-run"), *args], capture_output=True, text=True, timeout=600, env=env)


def phantoms(folder: Path, seeds: range, truth: Path | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"p{seed}.nii.gz"
        label = (truth or folder.parent / "truth") / f"p{seed}.nii.gz"
        label.parent.mkdir(exist_ok=True)
        write_phantom_nifti(make_phantom(seed, (32, 64, 64)), path, label, overwrite=True)
        paths.append(path)
    return paths


def rows(out: Path) -> dict[str, RunRow]:
    return RunManifest(out).latest()


def test_rerun_skips_done_inputs_and_retries_failed_ones(tmp_path: Path):
    inputs = tmp_path / "in"
    phantoms(inputs, range(3))
    (inputs / "p9.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    first = ldseg_run(str(inputs), "-o", str(out), *RUN)
    assert first.returncode == 3, first.stderr  # some inputs failed: the code of their kind (bad input)
    before = rows(out)
    assert sorted((Path(k).name, r.status) for k, r in before.items()) == [
        ("p0.nii.gz", "ok"),
        ("p1.nii.gz", "ok"),
        ("p2.nii.gz", "ok"),
        ("p9.nii.gz", "failed"),
    ]
    assert before[str(inputs / "p9.nii.gz")].error_kind == "input"
    assert "p9.nii.gz" in before[str(inputs / "p9.nii.gz")].error
    ok = before[str(inputs / "p0.nii.gz")]
    assert ok.backend == "torch" and ok.outputs == [str(out / "p0_seg.nii.gz")] and ok.seconds and ok.stages

    phantoms(inputs, range(9, 10))  # the bad file mended
    second = ldseg_run(str(inputs), "-o", str(out), *RUN)
    assert second.returncode == 0, second.stderr
    assert "already done: 3 (manifest)" in second.stderr
    after = rows(out)
    assert all(r.status == "ok" for r in after.values()) and len(after) == 4
    for key in (str(inputs / f"p{s}.nii.gz") for s in range(3)):
        assert after[key].pid == before[key].pid  # rows (and outputs) of the first run kept
    assert after[str(inputs / "p9.nii.gz")].pid != ok.pid
    assert len(out.joinpath(MANIFEST_NAME).read_text().splitlines()) == 5  # header + one row per input


def test_outputs_of_a_run_killed_while_writing_are_replaced(tmp_path: Path):
    inputs = tmp_path / "in"
    phantoms(inputs, range(2))
    out = tmp_path / "out"
    assert ldseg_run(str(inputs), "-o", str(out), *RUN).returncode == 0
    # As a kill -9 mid-volume leaves it: the `writing` row last, a file that is not a volume.
    key = str(inputs / "p1.nii.gz")
    RunManifest(out).append(RunRow(key, "writing", outputs=[str(out / "p1_seg.nii.gz")]))
    (out / "p1_seg.nii.gz").write_bytes(b"half a volume")
    again = ldseg_run(str(inputs), "-o", str(out), *RUN)
    assert again.returncode == 0, again.stderr
    assert "already done: 1 (manifest)" in again.stderr
    assert nib.load(out / "p1_seg.nii.gz").shape == nib.load(inputs / "p1.nii.gz").shape
    assert rows(out)[key].status == "ok"


def test_an_existing_file_the_manifest_does_not_own_is_still_protected(tmp_path: Path):
    inputs = tmp_path / "in"
    phantoms(inputs, range(1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "p0_seg.nii.gz").write_bytes(b"someone's file")
    result = ldseg_run(str(inputs), "-o", str(out), *RUN)
    assert result.returncode == 5 and "exists" in result.stderr
    assert (out / "p0_seg.nii.gz").read_bytes() == b"someone's file"


def test_array_job_parts_cover_every_input_once(tmp_path: Path):
    inputs = tmp_path / "in"
    paths = phantoms(inputs, range(5))
    out = tmp_path / "out"
    for part in range(2):
        result = ldseg_run(str(inputs), "-o", str(out), "--num-parts", "2", "--part-id", str(part), *RUN)
        assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in out.glob("*_seg.nii.gz"))
    assert written == sorted(f"p{s}_seg.nii.gz" for s in range(5))
    assert sorted(rows(out)) == sorted(str(p) for p in paths)
    bad = ldseg_run(str(inputs), "-o", str(out), "--num-parts", "2", "--part-id", "2", *RUN)
    assert bad.returncode == 2 and "--part-id" in bad.stderr


def test_label_column_of_an_input_list_gives_dice_in_the_manifest(tmp_path: Path):
    inputs, truth = tmp_path / "in", tmp_path / "truth"
    paths = phantoms(inputs, range(2), truth)
    listing = tmp_path / "cohort.csv"
    listing.write_text("path,label\n" + "".join(f"in/{p.name},truth/{p.name}\n" for p in paths))
    out = tmp_path / "out"
    result = ldseg_run(str(listing), "-o", str(out), "--backend", "torch", "--threads", "1")
    assert result.returncode == 0, result.stderr
    for path in paths:
        row = rows(out)[str(path)]
        reference = np.asarray(nib.load(truth / path.name).dataobj)
        assert_several_classes(reference)
        seg = np.asarray(nib.load(out / path.name.replace(".nii.gz", "_seg.nii.gz")).dataobj)
        expected = dice_per_class(seg, reference, 3)
        assert row.dice_mean == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
        assert list(row.dice.values()) == pytest.approx(list(expected.values()), abs=1e-6)
        assert row.dice_mean > 0.5  # the demo model segments its phantoms: a number that can fail


def test_ray_engine_without_ray_says_how_to_install_it(monkeypatch):
    from ldseg.errors import BackendUnavailable
    from ldseg.runs.ray_engine import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    with pytest.raises(BackendUnavailable, match=r"pip install 'ldseg\[ray\]'"):
        import_ray()
