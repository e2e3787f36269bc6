"""The run manifest (ldseg-run.csv): a stable schema, rows that survive a killed run, one row per input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ldseg.errors import ArtifactError, BackendUnavailable, InputError, LdsegError, OutputError
from ldseg.runs.manifest import COLUMNS, MANIFEST_NAME, RunManifest, RunRow, error_kind, exit_code_of

# The published schema: changing it breaks users' notebooks and resuming old runs. Add columns
# at the end, never rename or reorder, and update README's description with this list.
SCHEMA = (
    "input",
    "status",
    "error_kind",
    "error",
    "outputs",
    "backend",
    "device",
    "precision",
    "host",
    "pid",
    "finished",
    "seconds",
    "read_ms",
    "infer_ms",
    "write_ms",
    "stages",
    "label",
    "dice_mean",
    "dice",
    "run_key",
)


def test_schema_is_stable():
    assert COLUMNS == SCHEMA


def _row(name: str, status: str = "ok", **fields: object) -> RunRow:
    return RunRow(f"/data/{name}.nii.gz", status, **fields)  # type: ignore[arg-type]


def test_rows_round_trip_through_csv(tmp_path: Path):
    manifest = RunManifest(tmp_path)
    row = _row(
        "a",
        outputs=["/out/a_seg.nii.gz", "/out/a_qc.json"],
        backend="openvino",
        device="cpu",
        precision="bf16",
        pid=12,
        seconds=1.5,
        read_ms=3.25,
        stages={"encoder": 12.3456, "decoder": 20.0},
        label="/labels/a.nii.gz",
        dice_mean=0.9,
        dice={"femur": 0.95, "tibia": 0.85},
        error='quotes " and, commas',
    )
    manifest.append(row)
    back = manifest.latest()[row.input]
    assert back.outputs == row.outputs and back.dice == row.dice and back.pid == 12
    assert back.stages == {"encoder": 12.346, "decoder": 20.0}  # ms, rounded to the microsecond
    assert back.error == row.error and back.seconds == 1.5 and back.infer_ms is None
    with open(manifest.path, newline="") as f:
        assert tuple(next(csv.reader(f))) == SCHEMA


def test_last_row_of_an_input_is_its_state_and_compaction_keeps_only_it(tmp_path: Path):
    manifest = RunManifest(tmp_path)
    manifest.append(_row("a", "failed", error_kind="input", error="bad"))
    manifest.append(_row("b", "writing"))
    manifest.append(_row("a", "writing"))
    manifest.append(_row("a", "ok"))
    latest = manifest.compact()
    assert {k: r.status for k, r in latest.items()} == {"/data/a.nii.gz": "ok", "/data/b.nii.gz": "writing"}
    lines = manifest.path.read_text().splitlines()
    assert len(lines) == 3  # header + one row per input


def test_a_line_cut_short_by_a_killed_run_is_dropped(tmp_path: Path):
    manifest = RunManifest(tmp_path)
    manifest.append(_row("a"))
    with open(manifest.path, "a") as f:
        f.write("/data/b.nii.gz,ok,,,/out/b_se")  # killed mid-write: no newline, fields missing
    assert list(manifest.compact()) == ["/data/a.nii.gz"]
    manifest.append(_row("c"))
    assert list(manifest.latest()) == ["/data/a.nii.gz", "/data/c.nii.gz"]


def test_a_foreign_csv_is_refused_not_overwritten(tmp_path: Path):
    (tmp_path / MANIFEST_NAME).write_text("name,value\nx,1\n")
    with pytest.raises(OutputError, match="not a run manifest"):
        RunManifest(tmp_path).compact()
    assert (tmp_path / MANIFEST_NAME).read_text() == "name,value\nx,1\n"


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (InputError("x"), "input", 3),
        (ArtifactError("x"), "artifact", 4),
        (OutputError("x"), "output", 5),
        (BackendUnavailable("x"), "backend", 6),
        (LdsegError("x"), "error", 1),
    ],
)
def test_failure_kinds_and_their_exit_codes(exc, kind, code):
    assert error_kind(exc) == kind and exit_code_of(kind) == code
