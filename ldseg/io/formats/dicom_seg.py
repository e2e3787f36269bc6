"""DICOM SEG out through highdicom: one segment per foreground class, on the source series' slices.

The SEG references the SOP instances of the series the volume was read from (frame k sits on
source slice k, highdicom copies its position), names and colours each segment after the model's
classes, and identifies the algorithm (ldseg, version, checkpoint hash).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ldseg.errors import InputError, OutputError
from ldseg.io.atomic import atomic_write
from ldseg.io.nifti import Volume
from ldseg.io.validate import one_line
from ldseg.versions import LDSEG_VERSION as __version__

from .dicom import DicomSeries

SegType = Literal["binary", "fractional"]
NEEDS_DICOM = (
    "DICOM SEG output needs a DICOM series as input (this input is not DICOM); "
    "use --output-type nifti, nrrd or mha for it"
)
NO_FRAME_OF_REFERENCE = (
    "the series has no FrameOfReferenceUID, so a DICOM SEG cannot be placed on it; "
    "use --output-type nifti, nrrd or mha for it"
)
# Property types for the class names ldseg's presets use; any other class is coded as tissue.
_PROPERTY_TYPES: dict[str, Code] = {"femur": codes.SCT.Femur, "tibia": codes.SCT.Tibia}


@dataclass(frozen=True)
class Algorithm:
    """What made the segmentation, written into every segment's AlgorithmIdentificationSequence."""

    checkpoint_sha256: str | None
    parameters: dict[str, str] = field(default_factory=dict)  # e.g. preset, steps, seed


def dicom_source(reference: Volume) -> DicomSeries:
    """The DICOM series behind `reference`, checked to be one a SEG can reference; the one-sentence
    refusal when there is none (a run calls this right after reading, before any compute)."""
    if not isinstance(reference.source, DicomSeries):
        raise InputError(f"{reference.path}: {NEEDS_DICOM}")
    if not reference.source.frame_of_reference:
        raise InputError(f"{reference.path}: {NO_FRAME_OF_REFERENCE}")
    return reference.source


def _measured(source: DicomSeries) -> list[Dataset]:
    """The headers as highdicom should see them. highdicom copies the SEG's pixel measures from the
    first slice's header (even when given others, if the pixel spacing matches), and fails on a
    missing SliceThickness, which is Type 2 (often empty, or stripped by anonymizers). So on a copy
    of that header (files and the reader's headers stay as they are) SpacingBetweenSlices is the
    spacing the reader measured from the slice positions, and SliceThickness, where missing or
    empty, is that spacing too (contiguous slices)."""
    datasets = list(source.datasets)
    first = copy.deepcopy(datasets[0])
    spacing = f"{source.slice_spacing:.10g}"[:16]
    first.SpacingBetweenSlices = spacing
    if first.get("SliceThickness", None) in (None, ""):
        first.SliceThickness = spacing
    datasets[0] = first
    return datasets


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def _segments(names: tuple[str, ...], colors: tuple[str, ...], algorithm: Algorithm) -> list[hd.seg.SegmentDescription]:
    parameters = {"checkpoint_sha256": algorithm.checkpoint_sha256 or "unknown", **algorithm.parameters}
    identification = hd.AlgorithmIdentificationSequence(
        name="ldseg", family=codes.cid7162.ArtificialIntelligence, version=__version__, parameters=parameters
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=c,
            segment_label=names[c],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=_PROPERTY_TYPES.get(names[c].lower(), codes.SCT.Tissue),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*_rgb(colors[c])),
        )
        for c in range(1, len(names))
    ]


def write_dicom_seg(
    path: Path,
    values: np.ndarray,
    reference: Volume,
    *,
    names: tuple[str, ...],
    colors: tuple[str, ...],
    algorithm: Algorithm,
    seg_type: SegType = "binary",
    overwrite: bool = False,
) -> None:
    """Write a SEG for `reference`'s DICOM series, atomically.

    binary: `values` is the (i, j, k) label map, ids 0..len(names)-1. fractional: `values` is
    (len(names) - 1, i, j, k) probabilities of the foreground classes, in [0, 1].
    """
    path = Path(path)
    if not path.name.lower().endswith(".dcm"):
        raise OutputError(f"{path}: output name must end in .dcm")
    source = dicom_source(reference)
    if seg_type == "binary":
        if values.shape != reference.array.shape:
            raise ValueError(f"labels of shape {values.shape} for a volume of shape {reference.array.shape}")
        pixels = np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.uint8)  # (i, j, k) -> frames, rows, cols
    else:
        if values.shape != (len(names) - 1, *reference.array.shape):
            raise ValueError(f"probabilities of shape {values.shape} for {len(names) - 1} foreground classes")
        pixels = np.ascontiguousarray(np.clip(values, 0.0, 1.0).transpose(3, 2, 1, 0), dtype=np.float32)
    try:
        seg = hd.seg.Segmentation(
            source_images=_measured(source),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues(seg_type.upper()),
            segment_descriptions=_segments(names, colors, algorithm),
            series_instance_uid=hd.UID(),
            series_number=1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="ldseg",
            manufacturer_model_name="ldseg " + algorithm.parameters.get("preset", "model"),
            software_versions=__version__,
            device_serial_number=(algorithm.checkpoint_sha256 or "unknown")[:16],
            content_label="LDSEG",
            content_description="LDSeg latent-diffusion segmentation",
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom refuses sources it cannot reference (e.g. no FrameOfReferenceUID)
        raise InputError(f"{reference.path}: cannot reference this series in a DICOM SEG ({one_line(exc)})") from exc

    def write(tmp: Path) -> None:
        seg.save_as(tmp)

    atomic_write(path, write, overwrite)
