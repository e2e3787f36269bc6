"""runs/specs.py: each rule once (K >= 1, the choices, --overwrite against --skip-existing), and the
run key derived from the specs: every field counts but NOT_IN_RUN_KEY, and the keys of earlier runs
stay valid."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from ldseg.model.sampling import NOISE_VERSION
from ldseg.runs.outputs import checkpoint_digest, run_key, run_options
from ldseg.runs.specs import NOT_IN_RUN_KEY, ModelSpec, SamplingSpec, WriteSpec
from ldseg.runtime.artifacts.source import Source, source_config


def test_a_model_spec_defaults_to_the_demo_model_and_checks_its_choices() -> None:
    assert ModelSpec().checkpoint == "demo" and ModelSpec(bundle="b").bundle == Path("b")  # type: ignore[arg-type]
    for bad, words in [
        ({"backend": "tflite"}, "--backend tflite: choose one of auto, torch"),
        ({"precision": "fp64"}, "--precision fp64: choose one of auto, fp32"),
        ({"device": "tpu"}, "--device tpu"),
        ({"max_samples": 0}, "--max-samples must be at least 1"),
        ({"checkpoint": "a", "bundle": Path("b")}, "exactly one of"),
    ]:
        with pytest.raises(ValueError, match=words):
            ModelSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (lambda: SamplingSpec(samples=0), "--samples must be at least 1"),
        (lambda: SamplingSpec(steps=0), "--steps must be at least 1"),
        (lambda: SamplingSpec(sampler="euler"), "--sampler euler"),
        (lambda: WriteSpec(output_types=("png",)), "--output-type png"),
        (lambda: WriteSpec(seg_type="soft"), "--seg-type soft"),
        (lambda: WriteSpec(overwrite=True, skip_existing=True), "contradict"),
    ],
)
def test_each_rule_refuses_in_the_options_words(spec, words) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=words):
        spec()


def _old_key(source: Source, opts, precision: str) -> str:  # noqa: ANN001 - the formula before the specs
    cfg = source_config("demo", None, None)
    material = {
        "model": str(checkpoint_digest(source)),
        "sampler": opts.sampler or cfg.diffusion.sampler,
        "steps": opts.steps or cfg.diffusion.steps,
        "seed": opts.seed,
        "samples": opts.samples,
        "precision": precision,
        "outputs": list(opts.output_types),
        "seg_type": opts.seg_type,
        "probabilities": opts.save_probabilities,
        "series": opts.series,
        "noise": NOISE_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def test_the_run_key_is_derived_from_the_specs_and_unchanged_for_earlier_runs() -> None:
    source, cfg = Source("demo"), source_config("demo", None, None)
    base = run_options(
        SamplingSpec(5, "ddpm", 3, 4), WriteSpec(True, False, False, True, ("nifti", "mha"), "fractional")
    )
    key = run_key(source, cfg, base, "auto")
    assert key == _old_key(source, base, "auto")
    for name in ("seed", "samples", "steps", "save_probabilities", "output_types", "seg_type", "series"):
        changed = {"output_types": ("nrrd",), "seg_type": "binary", "series": "1.2"}.get(name)
        other = dataclasses.replace(
            base, **{name: changed if changed is not None else 7 if name != "save_probabilities" else False}
        )
        assert run_key(source, cfg, other, "auto") != key, name
    for name in NOT_IN_RUN_KEY:
        assert run_key(source, cfg, dataclasses.replace(base, **{name: True}), "auto") == key, name
