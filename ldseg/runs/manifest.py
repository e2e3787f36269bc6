"""The run manifest, `<out>/ldseg-run.csv`: one row per input, written as the run goes.

Every run into a folder (local or Ray, any shard) appends to the same file, one line per finished
input, under a file lock and fsynced, so Ctrl-C or a killed job leaves every row written so far
intact. CSV rather than Parquet for that reason: a Parquet file cannot be appended to, only
rewritten. The last row of an input is its state; each run starts by compacting the file to
those rows, so after a run there is one row per input.

Status: `ok` (outputs written), `failed` (error_kind + error say why; retried by the next run),
`skipped` (outputs existed, --skip-existing), `writing` (its outputs were being written when the
run died: the next run replaces them). A rerun of the same command skips inputs whose last row is
ok and whose outputs all exist.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from filelock import FileLock

from ldseg.errors import ArtifactError, BackendUnavailable, InputError, LdsegError, OutputError
from ldseg.io.atomic import atomic_write

MANIFEST_NAME = "ldseg-run.csv"
STATUSES = ("ok", "failed", "skipped", "writing")


@dataclass
class RunRow:
    """One input's outcome. The field order is the CSV's column order (the manifest's schema)."""

    input: str  # absolute path, the row's key
    status: str
    error_kind: str = ""  # input | output | artifact | backend | error (LdsegError subclasses)
    error: str = ""
    outputs: list[str] = field(default_factory=list)
    backend: str = ""
    device: str = ""
    precision: str = ""
    host: str = ""
    pid: int | None = None  # the process that ran the model (a Ray actor's worker on --engine ray)
    finished: str = ""  # ISO 8601 UTC
    seconds: float | None = None  # from the start of reading to the last output written, queueing included
    read_ms: float | None = None
    infer_ms: float | None = None
    write_ms: float | None = None
    stages: dict[str, float] = field(default_factory=dict)  # the backend's stage times, ms
    label: str = ""  # reference label, when one was given
    dice_mean: float | None = None  # mean over the foreground classes
    dice: dict[str, float] = field(default_factory=dict)  # per foreground class, by class name
    run_key: str = ""  # digest of the model and settings that made the outputs (runtime.outputs.run_key)

    def to_csv(self) -> dict[str, str]:
        out = {}
        for key, val in asdict(self).items():
            if val is None:
                out[key] = ""
            elif key == "outputs":
                out[key] = ";".join(val)
            elif isinstance(val, dict):
                digits = 3 if key == "stages" else 6  # ms to the microsecond; Dice to 1e-6
                out[key] = json.dumps({k: round(v, digits) for k, v in val.items()}, sort_keys=True) if val else ""
            elif isinstance(val, float):
                out[key] = f"{val:.6g}"
            else:
                out[key] = str(val)
        return out

    @classmethod
    def from_csv(cls, raw: dict[str, str]) -> RunRow:
        def number(key: str, kind: type) -> float | int | None:
            return kind(raw[key]) if raw[key] else None

        return cls(
            input=raw["input"],
            status=raw["status"],
            error_kind=raw["error_kind"],
            error=raw["error"],
            outputs=[p for p in raw["outputs"].split(";") if p],
            backend=raw["backend"],
            device=raw["device"],
            precision=raw["precision"],
            host=raw["host"],
            pid=number("pid", int),  # type: ignore[arg-type]
            finished=raw["finished"],
            seconds=number("seconds", float),
            read_ms=number("read_ms", float),
            infer_ms=number("infer_ms", float),
            write_ms=number("write_ms", float),
            stages=json.loads(raw["stages"]) if raw["stages"] else {},
            label=raw["label"],
            dice_mean=number("dice_mean", float),
            dice=json.loads(raw["dice"]) if raw["dice"] else {},
            run_key=raw["run_key"],
        )


COLUMNS = tuple(f.name for f in fields(RunRow))


ERROR_KINDS: dict[str, type[LdsegError]] = {
    "input": InputError,
    "artifact": ArtifactError,
    "output": OutputError,
    "backend": BackendUnavailable,
}


def error_kind(exc: LdsegError) -> str:
    """The manifest's name for a failure: input, artifact, output, backend, or error (any other)."""
    return next((kind for kind, cls in ERROR_KINDS.items() if isinstance(exc, cls)), "error")


def exit_code_of(kind: str) -> int:
    """The exit code of one kind of failure (README, exit codes)."""
    return ERROR_KINDS[kind].exit_code if kind in ERROR_KINDS else LdsegError.exit_code


class _LockFailed(OutputError):
    """The manifest's lock file cannot be made or taken."""


def _line(row: RunRow) -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, COLUMNS, lineterminator="\n").writerow(row.to_csv())
    return buffer.getvalue()


class RunManifest:
    """`<out_dir>/ldseg-run.csv`, shared by every process writing into `out_dir` (file lock)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / MANIFEST_NAME
        # A timeout rather than waiting forever on a lock that cannot be made (held for milliseconds).
        self._lock = FileLock(str(Path(out_dir) / f".{MANIFEST_NAME}.lock"), timeout=120)
        # Why the manifest could not be written (a full disk, say), once it could not: the run goes
        # on and reports each input's own failure; the caller warns that the record is incomplete.
        self.problem: str | None = None

    def _write(self, action: Callable[[], None]) -> None:
        if self.problem is not None:
            return
        try:
            action()
        except OutputError as exc:
            self.problem = str(exc)

    def _read(self) -> list[RunRow]:
        """Every complete row; a line cut short by a killed run is dropped (its input is redone)."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(f"{self.path}: cannot read the run manifest ({exc})") from exc
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return []
        if tuple(header) != COLUMNS:
            raise OutputError(
                f"{self.path}: not a run manifest of this ldseg version (columns differ); move it away to start afresh"
            )
        rows = []
        for values in reader:
            if len(values) != len(COLUMNS) or values[1] not in STATUSES:
                continue
            try:
                rows.append(RunRow.from_csv(dict(zip(COLUMNS, values))))
            except (ValueError, json.JSONDecodeError):
                continue
        return rows

    def latest(self) -> dict[str, RunRow]:
        """The last row of every input: its state."""
        with self._locked():
            return {row.input: row for row in self._read()}

    def compact(self) -> dict[str, RunRow]:
        """Rewrite the file as the last row of each input (atomically); returns those rows. A file
        that is not a run manifest is refused (OutputError); one that cannot be written sets `problem`."""
        try:
            with self._locked():
                latest = {row.input: row for row in self._read()}
                self._write(lambda: self._rewrite(latest.values()))
                return latest
        except _LockFailed as exc:  # the lock file itself cannot be made: an unwritable or full folder
            self.problem = self.problem or str(exc)
            return {row.input: row for row in self._read()}

    def _rewrite(self, rows: Iterable[RunRow]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(",".join(COLUMNS) + "\n")
                for row in rows:
                    f.write(_line(row))

        atomic_write(self.path, write, overwrite=True)

    def append(self, row: RunRow) -> None:
        """One line, written whole and fsynced before returning (or `problem` set, and nothing more written)."""
        self._write(lambda: self._append(row))

    def _append(self, row: RunRow) -> None:
        with self._locked():
            if not self.path.exists():
                self._rewrite([])
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, _line(row).encode("utf-8"))
                os.fsync(fd)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot append to the run manifest ({exc.strerror})") from exc
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The manifest's file lock; OutputError if the lock file cannot be made or taken."""
        try:
            self._lock.acquire()
        except OSError as exc:
            raise _LockFailed(f"{self.path}: cannot lock the run manifest ({exc})") from exc
        try:
            yield
        finally:
            self._lock.release()
