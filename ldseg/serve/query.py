"""The query of POST /v1/segment (and of the DICOMweb endpoint), checked into typed values; a bad
value is a 400 naming the parameter and what it accepts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ldseg.choices import OUTPUT_TYPES, SEG_TYPES
from ldseg.serve.errors import HttpProblem

MAX_STEPS = 1000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_KNOWN = {"format", "output_type", "samples", "steps", "seed", "seg_type", "series", "filename"}


@dataclass(frozen=True)
class SegmentQuery:
    format: str | None = None
    output_type: str = "nifti"
    samples: int = 1
    steps: int | None = None
    seed: int = 0
    seg_type: str = "binary"
    series: str | None = None  # a SeriesInstanceUID, for a zip holding several series
    filename: str | None = None  # what outputs are named after (default "upload")


def _int(params: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        number = int(raw)
    except ValueError:
        raise HttpProblem(400, f"{name}={raw}: not a whole number", "options") from None
    if not low <= number <= high:
        raise HttpProblem(400, f"{name}={raw}: must be in {low}..{high}", "options")
    return number


def check_uid(value: str, what: str) -> str:
    if len(value) > 64 or not _UID.match(value):
        raise HttpProblem(400, f"{what} {value!r} is not a DICOM UID (digits and dots, at most 64)", "options")
    return value


def parse_query(params: Mapping[str, str], max_samples: int) -> SegmentQuery:
    """The query checked; `max_samples` is the largest K this service was started for (--max-samples)."""
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise HttpProblem(400, f"unknown query parameter(s) {', '.join(unknown)}: use {', '.join(sorted(_KNOWN))}")
    output_type = params.get("output_type") or "nifti"
    if output_type not in OUTPUT_TYPES:
        raise HttpProblem(400, f"output_type={output_type}: choose from {', '.join(OUTPUT_TYPES)}", "options")
    seg_type = params.get("seg_type") or "binary"
    if seg_type not in SEG_TYPES:
        raise HttpProblem(400, f"seg_type={seg_type}: choose binary or fractional", "options")
    series = params.get("series") or None
    samples = _int(params, "samples", 1, 2**31 - 1) or 1
    if samples > max_samples:
        raise HttpProblem(
            400,
            f"samples={samples}: this service takes at most {max_samples} samples per request "
            "(its engines are built for that; ldseg-serve --max-samples sets it)",
            "options",
        )
    return SegmentQuery(
        format=params.get("format") or None,
        output_type=output_type,
        samples=samples,
        steps=_int(params, "steps", 1, MAX_STEPS),
        seed=_int(params, "seed", 0, 2**31 - 1) or 0,
        seg_type=seg_type,
        series=None if series is None else check_uid(series, "series"),
        filename=params.get("filename") or None,
    )
