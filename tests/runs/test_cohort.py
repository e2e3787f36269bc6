"""A cohort's inputs (files, folders, CSV/Parquet lists), sharding for array jobs, and the run's numbers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ldseg.errors import InputError
from ldseg.runs.cohort import CohortInput, CohortStats, collect_inputs, read_input_list, shard
from ldseg.runs.manifest import RunRow


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
def test_parts_cover_every_input_exactly_once_whatever_the_listing_order(parts):
    inputs = [CohortInput(Path(f"/cohort/case{i:03d}.nii.gz")) for i in range(23)]
    covered: list[Path] = []
    for part in range(parts):
        listed = inputs[:]
        random.Random(part).shuffle(listed)  # each array job may list the folder in another order
        covered += [c.path for c in shard(listed, parts, part)]
    assert sorted(covered) == sorted(c.path for c in inputs)
    sizes = [len(shard(inputs, parts, p)) for p in range(parts)]
    assert max(sizes) - min(sizes) <= 1


def test_an_input_listed_twice_runs_once():
    item = CohortInput(Path("/cohort/a.nii.gz"))
    assert shard([item, item, CohortInput(Path("/cohort/./a.nii.gz"))], 1, 0) == [item]


def test_bad_part_ids_are_refused():
    with pytest.raises(ValueError, match="part-id"):
        shard([], 2, 2)


def test_csv_list_with_relative_paths_and_labels(tmp_path: Path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "cohort.csv"
    listing.write_text("path,label,site\n../a.nii.gz,../labels/a.nii.gz,x\n/abs/b.nii.gz,,y\n")
    assert read_input_list(listing) == [
        CohortInput(tmp_path / "lists" / "../a.nii.gz", tmp_path / "lists" / "../labels/a.nii.gz"),
        CohortInput(Path("/abs/b.nii.gz"), None),
    ]


def test_parquet_list(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    listing = tmp_path / "cohort.parquet"
    pq.write_table(pa.table({"path": ["a.nii.gz", "b.nii.gz"], "label": ["la.nii.gz", None]}), listing)
    assert read_input_list(listing) == [
        CohortInput(tmp_path / "a.nii.gz", tmp_path / "la.nii.gz"),
        CohortInput(tmp_path / "b.nii.gz", None),
    ]


def test_a_list_without_a_path_column_says_so(tmp_path: Path):
    listing = tmp_path / "cohort.csv"
    listing.write_text("file\na.nii.gz\n")
    with pytest.raises(InputError, match="'path' column"):
        collect_inputs([listing])


def test_labels_folder_fills_in_labels_by_file_name(tmp_path: Path):
    (tmp_path / "in").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "in" / name).write_bytes(b"")
    (tmp_path / "labels" / "a.nii.gz").write_bytes(b"")
    found = collect_inputs([tmp_path / "in"], tmp_path / "labels")
    expected = [("a.nii.gz", tmp_path / "labels" / "a.nii.gz"), ("b.nii.gz", None)]
    assert [(c.path.name, c.label) for c in found] == expected


def test_stats_of_a_run():
    rows = [RunRow(f"/d/{i}", "ok", seconds=float(i)) for i in range(1, 21)]
    rows += [RunRow("/d/x", "failed", error_kind="input"), RunRow("/d/y", "failed", error_kind="input")]
    rows += [RunRow("/d/z", "failed", error_kind="output"), RunRow("/d/s", "skipped")]
    stats = CohortStats.of(rows, resumed=4, seconds=10.0)
    assert (stats.ok, stats.failed, stats.skipped, stats.resumed) == (20, 3, 1, 4)
    assert stats.volumes_per_s == 2.0
    assert stats.p50_s == pytest.approx(10.5) and stats.p95_s == pytest.approx(19.05)
    assert stats.failures_by_kind == {"input": 2, "output": 1}
    assert "failed: 3 (2 input, 1 output)" in stats.lines()
