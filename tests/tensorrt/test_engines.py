"""runtime/artifacts/engines.py and export/build_options.py: precision agreement, batch profiles, engines.json,
refusal logic, atomic folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ldseg.errors import ArtifactError, OutputError
from ldseg.export.build_options import (
    batch_profile,
    check_dla,
    check_optimization_level,
    graphs_to_build,
    resolve_precision,
    volume_profiles,
    write_engines_json,
)
from ldseg.io.atomic import staged_folder
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.artifacts.engines import (
    ENGINES_JSON,
    Environment,
    bundle_hash,
    check_engine_set,
    engine_set_problems,
    read_engine_set,
)
from tests.tensorrt.conftest import HERE, make_fake_bundle
from tests.tensorrt.emulator import emulated_volume_engines

# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("bundle_precision", ["fp32", "fp16", "int8"])
def test_best_takes_the_bundle_precision(bundle_precision: str) -> None:
    assert resolve_precision("best", bundle_precision) == bundle_precision
    assert resolve_precision(bundle_precision, bundle_precision) == bundle_precision


@pytest.mark.parametrize(
    ("requested", "bundle", "hint"),
    [
        ("fp16", "fp32", "ldseg-export onnx --precision fp16"),
        ("int8", "fp32", "ldseg-export calibrate"),
        ("int8", "fp16", "ldseg-export calibrate"),
        ("fp32", "int8", "ldseg-export onnx --precision fp32"),
        ("bf16", "fp32", "no BF16 bundles"),
        ("fp8", "fp16", "ModelOpt"),
    ],
)
def test_mismatch_is_an_artifact_error_saying_which_bundle_to_make(requested: str, bundle: str, hint: str) -> None:
    with pytest.raises(ArtifactError) as info:
        resolve_precision(requested, bundle, "b/")
    message = str(info.value)
    assert hint in message and f"bundle precision is {bundle}" in message and "--precision best" in message


def test_unknown_precision_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        resolve_precision("int4", "fp32")


def test_dla_needs_fp16_or_int8() -> None:
    check_dla(None, "fp32")
    check_dla(0, "fp16")
    check_dla(1, "int8")
    with pytest.raises(ArtifactError, match="DLA runs FP16 or INT8 only"):
        check_dla(0, "fp32")
    with pytest.raises(ValueError):
        check_dla(-1, "fp16")


def test_optimization_level_range() -> None:
    for level in (None, 0, 3, 5):
        check_optimization_level(level)
    with pytest.raises(ValueError, match="0..5"):
        check_optimization_level(6)


# --------------------------------------------------------------------------- profiles


def test_profiles_follow_the_bundle_specs(fake_bundle: Path) -> None:
    bundle = load_bundle(fake_bundle)
    cfg = bundle.config
    profile = batch_profile(bundle.graph("denoise_step"), max_batch=4)
    assert (profile.min_batch, profile.opt_batch, profile.max_batch) == (1, 4, 4)
    by_name = {i.name: i for i in profile.inputs}
    assert list(by_name) == ["z", "z_image", "coeffs", "noise"]
    assert by_name["z"].min == (1, *cfg.latent_shape)
    assert by_name["z"].opt == by_name["z"].max == (4, *cfg.latent_shape)
    assert by_name["coeffs"].max == (4, 4)
    enc = batch_profile(bundle.graph("encoder"), max_batch=3, opt_batch=2)
    assert enc.inputs[0].opt == (2, *cfg.image_shape) and enc.to_dict()["image"]["max"] == [3, *cfg.image_shape]
    assert enc.accepts(1) and enc.accepts(3) and not enc.accepts(4)


def test_fixed_profile_for_dla(fake_bundle: Path) -> None:
    profile = batch_profile(load_bundle(fake_bundle).graph("decoder"), max_batch=2, fixed=True)
    assert (profile.min_batch, profile.opt_batch, profile.max_batch) == (2, 2, 2)
    assert not profile.accepts(1)


@pytest.mark.parametrize(("max_batch", "opt"), [(0, None), (2, 3), (2, 0)])
def test_bad_batches_are_refused(fake_bundle: Path, max_batch: int, opt: int | None) -> None:
    with pytest.raises(ValueError):
        batch_profile(load_bundle(fake_bundle).graph("encoder"), max_batch, opt)


def test_graphs_to_build(fake_bundle: Path) -> None:
    bundle = load_bundle(fake_bundle)
    assert graphs_to_build(bundle) == ["encoder", "denoise_step", "decoder", "decoder_argmax"]
    assert graphs_to_build(bundle, include_denoiser=True)[-1] == "denoiser"
    partial = dataclasses.replace(bundle, graphs={k: v for k, v in bundle.graphs.items() if k != "decoder_argmax"})
    with pytest.raises(ArtifactError, match="decoder_argmax"):
        graphs_to_build(partial)


def test_volume_profiles_fix_the_model_grid_and_range_the_input_grid() -> None:
    profiles = volume_profiles((32, 64, 48), 300)
    pre = {i.name: i for i in profiles["volume_to_model_grid"]}
    assert (pre["volume"].min, pre["volume"].opt, pre["volume"].max) == ((1, 1, 1), (48, 64, 32), (300, 300, 300))
    assert pre["w_2"].min == pre["w_2"].max == (1, 1, 48) and pre["i0_0"].max == (32,)
    step = {i.name: i for i in profiles["volume_class_step"]}
    assert "klass" not in step  # a scalar: nothing to range
    assert step["values"].min == step["values"].max == (32, 64, 48)
    assert (step["best"].min, step["best"].opt, step["best"].max) == ((1, 1, 1), (32, 64, 48), (300, 300, 300))
    assert step["w_1"].max == (1, 300, 1) and step["i1_2"].opt == (48,)
    assert {i.name for i in profiles["volume_map"]} == set(step) - {"best", "index"}
    with pytest.raises(ValueError, match="largest axis"):
        volume_profiles((32, 64, 48), 63)


# --------------------------------------------------------------------------- engines.json


def test_volume_engines_round_trip_and_are_hash_checked(fake_engines: Path, tmp_path: Path) -> None:
    es = read_engine_set(fake_engines)
    engines, profiles = emulated_volume_engines(fake_engines, es.config.image_size, 256)
    with_volume = dataclasses.replace(es, volume_engines=engines, volume_profiles=profiles, max_input_grid=256)
    write_engines_json(fake_engines, with_volume)
    again = read_engine_set(fake_engines)
    by_name = lambda es: {g: {i.name: i for i in p} for g, p in es.volume_profiles.items()}  # noqa: E731
    assert again == dataclasses.replace(with_volume, volume_profiles=again.volume_profiles)  # JSON sorts the inputs
    assert by_name(again) == by_name(with_volume)
    assert again.engine_path("volume_map") == fake_engines / "volume_map.engine"
    data = json.loads((fake_engines / ENGINES_JSON).read_text())
    assert data["volume_ops"]["max_input_grid"] == 256
    assert data["volume_ops"]["profiles"]["volume_class_step"]["best"]["max"] == [256, 256, 256]
    assert engine_set_problems(fake_engines, HERE) == []
    (fake_engines / "volume_class_step.engine").write_bytes(b"tampered")
    (reason,) = check_engine_set(fake_engines, HERE)
    assert "volume_class_step.engine: SHA-256 does not match" in reason
    assert "volume_ops" not in json.loads(json.dumps(es.to_dict()))  # a set without them stays as it was


def test_engines_json_round_trip(fake_engines: Path, tmp_path: Path) -> None:
    es = read_engine_set(fake_engines)
    copy = tmp_path / "copy"
    copy.mkdir()
    write_engines_json(copy, es)
    again = read_engine_set(copy)
    assert again == dataclasses.replace(es, path=copy)
    data = json.loads((fake_engines / ENGINES_JSON).read_text())
    assert data["format"] == "ldseg-engines/1"
    assert data["gpu"] == {"name": HERE.gpu_name, "compute_capability": "9.0"}
    assert data["profiles"]["encoder"]["inputs"]["image"]["max"][0] == 2
    assert set(data["engines"]["encoder"]) >= {"file", "bytes", "sha256", "build_seconds"}
    assert es.config.preset == "demo" and es.max_batch == 2 and es.min_batch == 1


def test_unknown_format_and_malformed_json_are_artifact_errors(fake_engines: Path) -> None:
    path = fake_engines / ENGINES_JSON
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format": "ldseg-engines/99"}))
    with pytest.raises(ArtifactError, match="rebuild"):
        read_engine_set(fake_engines)
    del data["gpu"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="malformed"):
        read_engine_set(fake_engines)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        read_engine_set(fake_engines)


# --------------------------------------------------------------------------- refusal logic


def test_matching_set_has_no_problems(fake_engines: Path, fake_bundle: Path) -> None:
    assert check_engine_set(fake_engines, HERE) == []
    assert check_engine_set(fake_engines, HERE, bundle_hash=bundle_hash(fake_bundle)) == []


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            dataclasses.replace(HERE, trt_version="10.3.0.30"),
            "TensorRT 10.13.0.35, this machine has TensorRT 10.3.0.30",
        ),
        (
            dataclasses.replace(HERE, gpu_name="Orin", compute_capability="8.7"),
            "this GPU is Orin (compute capability 8.7)",
        ),
        (dataclasses.replace(HERE, compute_capability="9.1"), "compute capability 9.1"),
        (dataclasses.replace(HERE, gpu_name="NVIDIA H100 PCIe"), "NVIDIA H100 PCIe"),
    ],
)
def test_other_machine_is_refused(fake_engines: Path, env: Environment, needle: str) -> None:
    problems = engine_set_problems(fake_engines, env)
    assert [p.kind for p in problems] == ["environment"]
    assert needle in problems[0].message


def test_other_bundle_is_refused(fake_engines: Path, tmp_path: Path) -> None:
    other = make_fake_bundle(tmp_path / "other.bundle")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["batch"] = 2  # any change to the manifest is another bundle
    (other / "manifest.json").write_text(json.dumps(manifest))
    (reason,) = check_engine_set(fake_engines, HERE, bundle_hash=bundle_hash(other))
    assert "another bundle" in reason


def test_altered_or_missing_engine_is_refused(fake_engines: Path) -> None:
    (fake_engines / "denoise_step.engine").write_bytes(b"tampered")
    (fake_engines / "decoder.engine").unlink()
    problems = engine_set_problems(fake_engines, HERE)
    assert {p.kind for p in problems} == {"artifact"}
    text = " ".join(p.message for p in problems)
    assert "denoise_step.engine: SHA-256 does not match" in text and "decoder.engine: listed" in text


def test_not_an_engine_set(tmp_path: Path) -> None:
    (reason,) = check_engine_set(tmp_path, HERE)
    assert "not an ldseg engine set" in reason and "build-engine" in reason


def test_every_problem_is_reported_at_once(fake_engines: Path) -> None:
    (fake_engines / "encoder.engine").write_bytes(b"x")
    env = Environment("11.4.1", "Orin", "8.7")
    assert len(check_engine_set(fake_engines, env)) == 3


# --------------------------------------------------------------------------- atomic folders


def test_staged_folder_renames_into_place(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with staged_folder(target, overwrite=False, marker=ENGINES_JSON) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        (tmp / ENGINES_JSON).write_text("{}")
        assert not target.exists()  # nothing visible until the end
    assert (target / ENGINES_JSON).read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="build failed"):
        with staged_folder(target, overwrite=False, marker=ENGINES_JSON) as tmp:
            (tmp / "encoder.engine").write_bytes(b"half")
            raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite_and_failed_overwrite_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / ENGINES_JSON).write_text("old")
    with pytest.raises(OutputError, match="--overwrite"):
        with staged_folder(target, overwrite=False, marker=ENGINES_JSON):
            pass
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target, overwrite=True, marker=ENGINES_JSON) as tmp:
            (tmp / ENGINES_JSON).write_text("new")
            raise KeyboardInterrupt
    assert (target / ENGINES_JSON).read_text() == "old"
    with staged_folder(target, overwrite=True, marker=ENGINES_JSON) as tmp:
        (tmp / ENGINES_JSON).write_text("new")
    assert (target / ENGINES_JSON).read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="refusing to replace"):
        with staged_folder(home, overwrite=True, marker=ENGINES_JSON):
            pass
    assert (home / "thesis.tex").read_text() == "precious"
