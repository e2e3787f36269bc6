"""The head start of a cold run: the first input is read while the backend builds, and the run
uses that read (once, for the same path and model) or fails on it exactly as a later read would."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ldseg.runs.head_start as reading
from ldseg.cli.run import run_typer
from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.errors import InputError
from ldseg.model.checkpoint import save_checkpoint
from ldseg.model.config import PRESETS
from ldseg.model.network import COMPONENTS, LDSeg
from ldseg.runs.head_start import head_start, head_start_for, prepare_input
from ldseg.runs.volumes import prepare

CFG = PRESETS["demo"]


@pytest.fixture()
def phantom(tmp_path: Path) -> Path:
    path = tmp_path / "p1.nii.gz"
    write_phantom_nifti(make_phantom(1, (30, 60, 70)), path, tmp_path / "truth.nii.gz", overwrite=False)
    return path


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str]]:
    """(path, thread) of each read head_start and prepare_input make (both call `prepare`)."""
    calls: list[tuple[Path, str]] = []

    def counting(path: Path, cfg: object, series: str | None = None, ops: object = None) -> object:
        calls.append((path, threading.current_thread().name))
        return prepare(path, cfg, series, ops)  # type: ignore[arg-type]

    monkeypatch.setattr(reading, "prepare", counting)
    return calls


def test_the_head_start_is_taken_once_and_equals_a_read(phantom: Path, counted: list[tuple[Path, str]]) -> None:
    with head_start(phantom, CFG, None):
        first = prepare_input(phantom, CFG, None)
        again = prepare_input(phantom, CFG, None)  # taken already: a plain read
    assert counted == [(phantom, "ldseg-head-start"), (phantom, threading.current_thread().name)]
    np.testing.assert_array_equal(first.image, prepare(phantom, CFG).image)
    np.testing.assert_array_equal(first.image, again.image)


def test_another_model_or_series_reads_for_itself(phantom: Path, counted: list[tuple[Path, str]]) -> None:
    other = PRESETS["knee3d"]
    with head_start(phantom, CFG, None):
        assert prepare_input(phantom, CFG, "1.2.3").image.shape == (1, *CFG.image_size)
        assert prepare_input(phantom, other, None).image.shape == (1, *other.image_size)
    assert len(counted) == 3  # the head start's read was never taken, and is dropped with the block
    assert not reading._pending


def test_a_bad_first_file_fails_as_its_read_would(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume")
    with pytest.raises(InputError) as direct:
        prepare(bad, CFG)
    with head_start(bad, CFG, None), pytest.raises(InputError) as started:
        prepare_input(bad, CFG, None)
    assert str(started.value) == str(direct.value)


def test_no_head_start_without_inputs_or_a_readable_source(tmp_path: Path, phantom: Path) -> None:
    assert head_start_for([], None, None, None, None).__class__.__name__ == "nullcontext"
    missing = str(tmp_path / "missing.safetensors")
    assert head_start_for([phantom], missing, None, None, None).__class__.__name__ == "nullcontext"


def test_ldseg_run_reads_its_one_input_once(phantom: Path, counted: list[tuple[Path, str]], tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "random.safetensors"
    save_checkpoint(LDSeg(CFG, trained={name: True for name in COMPONENTS}).eval(), checkpoint, overwrite=False)
    args = [str(phantom), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--backend", "torch"]
    result = CliRunner().invoke(run_typer, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert counted == [(phantom, "ldseg-head-start")]  # read once, while the backend was built, and used
    assert (tmp_path / "out" / "p1_seg.nii.gz").is_file()
