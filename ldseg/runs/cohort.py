"""A cohort run's inputs and its numbers, the same for the local and the Ray engine.

Inputs are files, folders, or input manifests (CSV or Parquet with a `path` column and an optional
`label` column of reference labels for Dice). `shard` splits them for array jobs
(`--num-parts K --part-id i`), and `CohortStats` sums up a run from its manifest rows.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldseg.errors import InputError
from ldseg.runs.manifest import RunRow
from ldseg.runs.volumes import expand_folder

MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "input")  # `input`: a previous run's ldseg-run.csv works as an input list


@dataclass(frozen=True)
class CohortInput:
    path: Path
    label: Path | None = None  # reference label on the input's grid: Dice in the manifest


def key_of(path: Path) -> str:
    """The manifest's key for an input: its absolute path (symlinks kept as named)."""
    return os.path.abspath(path)


def _table(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise InputError(f"{path}: reading a Parquet input list needs pyarrow (pip install 'ldseg[ray]')") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError kinds
            raise InputError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})") from exc
        return [{k: "" if v is None else str(v) for k, v in row.items()} for row in table.to_pylist()]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: v or "" for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from exc


def read_input_list(path: Path) -> list[CohortInput]:
    """The inputs an input manifest names; relative paths are relative to the manifest's folder."""
    rows = _table(path)
    column = next((c for c in PATH_COLUMNS if rows and c in rows[0]), None)
    if column is None:
        raise InputError(f"{path}: an input list needs a 'path' column (and optionally 'label')")
    base = path.parent

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    inputs = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if not row[column].strip():
            raise InputError(f"{path}: row {number} has an empty {column}")
        label = row.get("label", "").strip()
        inputs.append(CohortInput(resolve(row[column].strip()), resolve(label) if label else None))
    return inputs


def is_input_list(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES)


def collect_inputs(items: Iterable[Path], labels_dir: Path | None = None) -> list[CohortInput]:
    """Files as given, folders as the inputs they hold, input lists as the rows they name; with
    `labels_dir`, an input without a label column takes `labels_dir/<its file name>` if it exists.
    A missing file or folder named here is an InputError; one named inside a list fails its own row."""
    found: list[CohortInput] = []
    for item in map(Path, items):
        if is_input_list(item):
            found += read_input_list(item)
        elif item.is_dir():
            found += [CohortInput(p) for p in expand_folder(item)]
        elif item.exists():
            found.append(CohortInput(item))
        else:
            raise InputError(f"{item}: no such file or folder")
    if labels_dir is not None:
        found = [c if c.label is not None else _with_label(c, labels_dir / c.path.name) for c in found]
    return found


def _with_label(item: CohortInput, label: Path) -> CohortInput:
    return CohortInput(item.path, label) if label.exists() else item


def shard(inputs: list[CohortInput], num_parts: int, part_id: int) -> list[CohortInput]:
    """Part `part_id` of `num_parts`: every num_parts-th input in sorted path order, so K jobs given the
    same inputs cover each exactly once, whatever order they were listed in."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id {part_id} must be in 0..{num_parts - 1} (--num-parts {num_parts})")
    ordered = sorted({key_of(c.path): c for c in inputs}.items())  # an input listed twice runs once
    return [c for _, c in ordered[part_id::num_parts]]


@dataclass(frozen=True)
class CohortStats:
    """What a run did, from the rows it wrote (inputs resumed from an earlier run are counted apart)."""

    ok: int
    failed: int
    skipped: int
    resumed: int
    seconds: float
    p50_s: float | None
    p95_s: float | None
    failures_by_kind: dict[str, int]

    @property
    def volumes_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, rows: list[RunRow], resumed: int, seconds: float) -> CohortStats:
        latencies = [r.seconds for r in rows if r.status == "ok" and r.seconds is not None]
        p50 = float(np.percentile(latencies, 50)) if latencies else None
        p95 = float(np.percentile(latencies, 95)) if latencies else None
        return cls(
            ok=sum(r.status == "ok" for r in rows),
            failed=sum(r.status == "failed" for r in rows),
            skipped=sum(r.status == "skipped" for r in rows),
            resumed=resumed,
            seconds=seconds,
            p50_s=p50,
            p95_s=p95,
            failures_by_kind=dict(Counter(r.error_kind for r in rows if r.status == "failed")),
        )

    def lines(self) -> list[str]:
        text = [f"{self.ok} volume(s) in {self.seconds:.1f} s ({self.volumes_per_s:.2f} volumes/s)"]
        if self.p50_s is not None and self.p95_s is not None:
            text.append(f"per-volume latency: p50 {self.p50_s:.2f} s, p95 {self.p95_s:.2f} s")
        if self.resumed or self.skipped:
            text.append(f"already done: {self.resumed} (manifest), skipped: {self.skipped} (--skip-existing)")
        if self.failed:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.failures_by_kind.items()))
            text.append(f"failed: {self.failed} ({kinds})")
        return text
