"""Which files one input produces (planned before compute) and how each is written.

`--output-type` may name several of nifti, nrrd, mha, dicom-seg. Every map (labels, confidence,
entropy, probabilities) is written in each volume format asked for; dicom-seg adds one SEG per
input holding the labels (BINARY) or the foreground class probabilities (FRACTIONAL). A SEG needs
a DICOM series as input: any other input is refused before it is computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ldseg.errors import InputError
from ldseg.io.formats import DICOM, format_of
from ldseg.io.nifti import Volume
from ldseg.model.config import ModelConfig
from ldseg.model.sampling import NOISE_VERSION
from ldseg.runs.specs import NOT_IN_RUN_KEY, SamplingSpec, WriteSpec

if TYPE_CHECKING:
    from ldseg.io.formats.dicom_seg import Algorithm
    from ldseg.runs.types import RunOptions
    from ldseg.runs.volumes import Prepared
    from ldseg.runtime.artifacts.source import Source


@dataclass(frozen=True)
class Target:
    path: Path
    output_type: str  # one of OUTPUT_TYPES
    suffix: str  # the map it holds ("_seg", "_confidence", ...); "_seg" for a SEG


def check_output_options(cfg: ModelConfig, opts: RunOptions) -> None:
    """ValueError (a usage error) for what this model cannot write (the choices themselves are
    checked by runs/specs.WriteSpec)."""
    if cfg.spatial_dims == 2 and opts.output_types != ("nifti",):
        raise ValueError("a 2D model writes PNG label images; --output-type applies to 3D models")
    if float_maps(opts) and set(opts.output_types) == {"dicom-seg"}:
        raise ValueError(
            "a DICOM SEG holds the segmentation only: add --output-type nifti, nrrd or mha "
            "for the confidence, entropy or probability maps"
        )


def float_maps(opts: RunOptions) -> bool:
    """Maps beside the labels are written: K > 1 (confidence, entropy) or probabilities asked for."""
    return opts.samples > 1 or opts.save_probabilities


def seg_needs_probabilities(opts: RunOptions) -> bool:
    return "dicom-seg" in opts.output_types and opts.seg_type == "fractional"


def checkpoint_digest(source: Source) -> str | None:
    """The content hash of the checkpoint behind a source (a bundle records its own), if known."""
    from ldseg.model.checkpoint_file import read_metadata
    from ldseg.runtime.artifacts.bundle import MANIFEST, read_json_object
    from ldseg.runtime.artifacts.source import resolve_checkpoint

    if source.checkpoint is not None:
        return read_metadata(resolve_checkpoint(source.checkpoint)).get("content_sha256")
    if source.bundle is not None:
        return read_json_object(source.bundle / MANIFEST, "bundle manifest").get("checkpoint_hash")
    return None


def algorithm_for(source: Source, cfg: ModelConfig, opts: RunOptions) -> Algorithm:
    """What a SEG names as its algorithm: the checkpoint's content hash and the sampling settings."""
    parameters = {
        "preset": cfg.preset,
        "sampler": opts.sampler or cfg.diffusion.sampler,
        "steps": str(opts.steps or cfg.diffusion.steps),
        "seed": str(opts.seed),
        "samples": str(opts.samples),
    }
    from ldseg.io.formats.dicom_seg import Algorithm  # highdicom on first use

    return Algorithm(checkpoint_digest(source), parameters)


# Names in the run key's material where they differ from the spec's (keys written by earlier runs stay valid).
_KEY_NAMES = {"output_types": "outputs", "save_probabilities": "probabilities"}


def run_key(source: Source, cfg: ModelConfig, opts: RunOptions, precision: str) -> str:
    """What decides an input's outputs, as a short digest kept in its manifest row: the model (the
    checkpoint's hash, or the bundle's or engine set's own), sampling settings, precision asked
    for, and the files asked for. A rerun counts a row as done only under the same key; with other
    settings the earlier outputs are existing files (refused without --overwrite), never "done"."""
    from ldseg.runtime.artifacts.bundle import sha256_file

    if source.engines is not None:
        model = sha256_file(source.engines / "engines.json")
    elif source.bundle is not None:
        model = sha256_file(source.bundle / "manifest.json")
    else:
        model = str(checkpoint_digest(source))
    # Every spec field (a new option included) but those that do not change the files written.
    names = [f.name for spec in (SamplingSpec, WriteSpec) for f in dataclasses.fields(spec)]
    material: dict[str, object] = {
        _KEY_NAMES.get(name, name): getattr(opts, name) for name in names if name not in NOT_IN_RUN_KEY
    }
    material.update(
        {
            "model": model,
            "sampler": opts.sampler or cfg.diffusion.sampler,
            "steps": opts.steps or cfg.diffusion.steps,
            "precision": precision,
            "outputs": list(opts.output_types),
            "noise": NOISE_VERSION,  # what a seed draws (ldseg.model.sampling): rows made with other noise never count
        }
    )
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def run_options(sampling: SamplingSpec, write: WriteSpec | None = None) -> RunOptions:
    """The flat options the run steps go by, from the specs (no checks against a model yet)."""
    from ldseg.runs.types import RunOptions

    return RunOptions(**_spec_values(sampling, write or WriteSpec()))


def _spec_values(*specs: SamplingSpec | WriteSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for spec in specs for f in dataclasses.fields(spec)}


def plan_options(
    source: Source, cfg: ModelConfig, sampling: SamplingSpec, write: WriteSpec, precision: str
) -> RunOptions:
    """The options a run into files goes by, planned once for Segmenter.write, the Ray driver and the
    service alike: checked against the model (ValueError), the SEG's algorithm record, the run key."""
    opts = run_options(sampling, write)
    check_output_options(cfg, opts)
    if "dicom-seg" in opts.output_types:  # the SEG names the checkpoint and the sampling settings
        opts = dataclasses.replace(opts, algorithm=algorithm_for(source, cfg, opts))
    return dataclasses.replace(opts, run_key=run_key(source, cfg, opts, precision))


def plan_targets(
    out_dir: Path, input_path: Path, cfg: ModelConfig, opts: RunOptions, suffixes: list[str]
) -> list[Target]:
    """Every file `input_path` will produce, in writing order."""
    from ldseg.runs.volumes import output_path

    targets = []
    for output_type in opts.output_types:
        if output_type == "dicom-seg":
            targets.append(Target(output_path(out_dir, input_path, cfg, "_seg", output_type), output_type, "_seg"))
            continue
        for suffix in suffixes:
            if suffix.startswith("_prob") and not opts.save_probabilities:
                continue  # computed for a FRACTIONAL SEG only
            targets.append(Target(output_path(out_dir, input_path, cfg, suffix, output_type), output_type, suffix))
    return targets


def refuse_unwritable(input_path: Path, opts: RunOptions) -> None:
    """A SEG asked for an input that is not a DICOM series: one sentence, before any compute."""
    if "dicom-seg" in opts.output_types and format_of(input_path) is not DICOM:
        from ldseg.io.formats.dicom_seg import NEEDS_DICOM

        raise InputError(f"{input_path}: {NEEDS_DICOM}")


def refuse_unreferenced(targets: list[Target], prepared: Prepared) -> None:
    """Once the input is read, before any compute: a SEG asked for a series it cannot reference
    (no FrameOfReferenceUID) is refused with that reason, not highdicom's after the model ran."""
    if isinstance(prepared.reference, Volume) and any(t.output_type == "dicom-seg" for t in targets):
        from ldseg.io.formats.dicom_seg import dicom_source  # highdicom: loaded when a SEG is asked for

        dicom_source(prepared.reference)


def write_target(
    target: Target,
    prepared: Prepared,
    outputs: dict[str, tuple[np.ndarray, type]],
    cfg: ModelConfig,
    opts: RunOptions,
    description: str | None = None,
) -> None:
    """One planned file; `description` (e.g. "ldseg openvino bf16") goes into a volume's header."""
    from ldseg.runs.volumes import write_map

    if target.output_type != "dicom-seg":
        values, dtype = outputs[target.suffix]
        write_map(
            target.path,
            prepared,
            values,
            overwrite=opts.overwrite,
            dtype=dtype,
            output_type=target.output_type,
            description=description,
        )
        return
    if opts.seg_type == "fractional":
        values = np.stack([outputs[f"_prob{c}"][0] for c in range(1, cfg.num_classes)])
    else:
        values = outputs["_seg"][0]
    if not isinstance(prepared.reference, Volume):  # check_output_options keeps 2D models off this path
        raise ValueError("a DICOM SEG is written for a 3D volume only")
    from ldseg.io.formats.dicom_seg import Algorithm, write_dicom_seg  # highdicom on first use

    write_dicom_seg(
        target.path,
        values,
        prepared.reference,
        names=cfg.names,
        colors=cfg.colors,
        algorithm=opts.algorithm or Algorithm(None),
        seg_type="fractional" if opts.seg_type == "fractional" else "binary",
        overwrite=opts.overwrite,
    )


def output_suffixes(cfg: ModelConfig, opts: RunOptions) -> list[str]:
    """The maps one input produces, as file-name suffixes (segment_prepared's keys)."""
    suffixes = ["_seg"]
    if opts.samples > 1:  # the one place that says what K > 1 adds
        suffixes += ["_confidence", "_entropy"]
    if opts.save_probabilities or seg_needs_probabilities(opts):
        suffixes += [f"_prob{c}" for c in range(cfg.num_classes)]
    return suffixes
