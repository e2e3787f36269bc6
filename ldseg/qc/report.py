"""report.html for a run: every volume's QC numbers, most uncertain first, outliers flagged.

One self-contained file (CSS, script and thumbnails inline; no server, no network), rendered by a
jinja2 template with autoescaping. Outlier rules compare each volume with the run's cohort:
they need at least MIN_COHORT volumes and say in words why a volume was flagged.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image

from ldseg.errors import InputError
from ldseg.io.atomic import atomic_write
from ldseg.qc.classes import class_color_hex
from ldseg.qc.metrics import LOW_CONFIDENCE, VolumeQC

REPORT_NAME = "report.html"
MIN_COHORT = 3  # cohort rules (volume, entropy) need this many volumes
VOLUME_RATIO = 2.0  # a class volume beyond x2 or below /2 of the cohort median is flagged
ENTROPY_Z = 3.5  # modified z-score (Iglewicz & Hoaglin) above which mean entropy is flagged
THUMBNAIL_WIDTH = 420


@dataclass
class Row:
    rank: int
    record: VolumeQC
    flags: list[str]
    thumbnail: str | None  # data: URI


def _modified_z(values: np.ndarray) -> np.ndarray:
    """0.6745 (x - median) / MAD; mean absolute deviation x 1.2533 where the MAD is 0."""
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    scale = mad / 0.6745 if mad > 0 else 1.2533 * np.mean(np.abs(values - median))
    if scale == 0:
        return np.zeros_like(values)
    return (values - median) / scale


def cohort_flags(records: list[VolumeQC]) -> dict[str, list[str]]:
    """Why each volume (by name) looks unusual: fragmented or missing structures, a class volume
    far from the cohort median, a mean structure entropy far above the cohort's."""
    flags: dict[str, list[str]] = {r.name: [] for r in records}
    cohort = len(records) >= MIN_COHORT
    for key in sorted({k for r in records for k in r.classes}, key=int):
        present = [r for r in records if key in r.classes]
        voxels = np.array([r.classes[key].voxels for r in present], dtype=np.float64)
        median = float(np.median(voxels)) if cohort else 0.0
        for r, n in zip(present, voxels):
            qc = r.classes[key]
            if qc.components > 1:
                flags[r.name].append(f"{qc.name}: {qc.components} components")
            if n == 0 and median > 0:
                flags[r.name].append(f"{qc.name}: missing")
            elif median > 0 and not 1 / VOLUME_RATIO <= n / median <= VOLUME_RATIO:
                flags[r.name].append(f"{qc.name}: volume {n / median:.2f}x the cohort median")
    scored = [r for r in records if r.mean_structure_entropy is not None]
    if len(scored) >= MIN_COHORT:
        z = _modified_z(np.array([r.mean_structure_entropy for r in scored], dtype=np.float64))
        for r, score in zip(scored, z):
            if score > ENTROPY_Z:
                flags[r.name].append(f"high entropy (robust z {score:.1f})")
    return flags


def ranked(records: list[VolumeQC]) -> list[VolumeQC]:
    """Most uncertain first (mean structure entropy); volumes without one last, by name."""
    return sorted(records, key=lambda r: (r.mean_structure_entropy is None, -(r.mean_structure_entropy or 0.0), r.name))


def _thumbnail(path: Path) -> str | None:
    """The preview scaled to THUMBNAIL_WIDTH, as a data: URI (the full picture stays a file)."""
    if not path.is_file():
        return None
    with Image.open(path) as im:
        im.thumbnail((THUMBNAIL_WIDTH, 10 * THUMBNAIL_WIDTH))
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_record(path: Path) -> VolumeQC:
    """A `<name>_qc.json` sidecar (a resumed run reports the volumes it skipped from these)."""
    try:
        return VolumeQC.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: not a readable ldseg QC sidecar ({exc})") from exc


def render_report(
    records: list[VolumeQC], out_dir: Path, run: dict[str, str], failures: list[tuple[str, str]] | None = None
) -> str:
    """The report's HTML; previews are read from `out_dir` (where the sidecars name them)."""
    flags = cohort_flags(records)
    rows = [
        Row(i + 1, r, flags[r.name], _thumbnail(out_dir / r.preview) if r.preview else None)
        for i, r in enumerate(ranked(records))
    ]
    keys = sorted({k for r in records for k in r.classes}, key=int)
    classes = [(k, next(r.classes[k].name for r in records if k in r.classes), class_color_hex(int(k))) for k in keys]
    env = Environment(
        loader=PackageLoader("ldseg.qc", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(
        rows=rows,
        classes=classes,
        run=run,
        failures=failures or [],
        flagged=sum(1 for r in rows if r.flags),
        with_entropy=any(r.mean_structure_entropy is not None for r in records),
        with_dice=any(c.dice is not None for r in records for c in r.classes.values()),
        with_mm3=any(c.volume_mm3 is not None for r in records for c in r.classes.values()),
        low_confidence=LOW_CONFIDENCE,
        rules={"min_cohort": MIN_COHORT, "volume_ratio": VOLUME_RATIO, "entropy_z": ENTROPY_Z},
        created=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_report(
    path: Path,
    records: list[VolumeQC],
    run: dict[str, str],
    failures: list[tuple[str, str]] | None = None,
    *,
    overwrite: bool,
) -> None:
    html = render_report(records, path.parent, run, failures)

    def write(tmp: Path) -> None:
        tmp.write_text(html, encoding="utf-8")

    atomic_write(path, write, overwrite)


def one_line(record: VolumeQC) -> str:
    """A volume's QC numbers in one line, for the console summary."""
    parts = []
    for qc in record.classes.values():
        size = f"{qc.volume_mm3:,.0f} mm³" if qc.volume_mm3 is not None else f"{qc.voxels:,} px"
        dice = f", Dice {qc.dice:.4f}" if qc.dice is not None else ""
        parts.append(f"{qc.name} {size}, {qc.components} component{'s' if qc.components != 1 else ''}{dice}")
    if record.mean_structure_entropy is not None and record.low_confidence_fraction is not None:
        parts.append(
            f"mean entropy {record.mean_structure_entropy:.4f}, unsure {100 * record.low_confidence_fraction:.2f} %"
        )
    return f"{record.name}: " + "; ".join(parts)
