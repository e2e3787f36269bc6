"""The run-level side of QC: the per-volume extras a run asks for, and its report.html (refused up
front if it exists, written at the end)."""

from __future__ import annotations

from pathlib import Path

from ldseg.errors import OutputError
from ldseg.model.config import ModelConfig
from ldseg.qc.metrics import VolumeQC
from ldseg.qc.report import REPORT_NAME, read_record, write_report
from ldseg.qc.volume import QC, QcExtras
from ldseg.runs.types import RunOptions, RunSummary
from ldseg.runtime.backend import Backend


def qc_extras(
    cfg: ModelConfig, samples: int, *, preview: bool, qc: bool, labels: Path | None, report: bool
) -> QcExtras | None:
    """What a run writes beside each volume's maps; None when nothing is asked for (the plain run
    then imports nothing of ldseg.qc)."""
    if not (preview or qc or report or labels is not None):
        return None
    return QcExtras(cfg, samples, preview=preview or report, qc=qc or report, labels=labels)


def report_target(out_dir: Path, opts: RunOptions) -> Path:
    """Where report.html goes; refused before any compute if it exists and not --overwrite."""
    target = out_dir / REPORT_NAME
    if target.exists() and not opts.overwrite:
        hint = "remove it to resume with --skip-existing" if opts.skip_existing else "use --overwrite"
        raise OutputError(f"{target}: exists ({hint})")
    return target


def write_run_report(
    target: Path, summary: RunSummary, extras: QcExtras, backend: Backend, cfg: ModelConfig, opts: RunOptions
) -> Path:
    """report.html for the volumes written now and those skipped or done before (read from their sidecars)."""
    records: list[VolumeQC] = [r for r in summary.records if isinstance(r, VolumeQC)]
    for path in summary.skipped + summary.resumed:
        records.append(read_record(extras.targets(target.parent, path)[QC]))
    run = {
        "model": cfg.preset,
        "backend": f"{backend.name} on {backend.device}, {backend.precision}",
        "samples K": str(opts.samples),
        "steps": str(opts.steps or cfg.diffusion.steps),
        "sampler": opts.sampler or cfg.diffusion.sampler,
        "seed": str(opts.seed),
    }
    failures = [(str(path), str(exc)) for path, exc in summary.failures]
    write_report(target, records, run, failures, overwrite=opts.overwrite)
    return target
