"""train() on the demo preset, a handful of steps on CPU: loss, checkpoint, resume, freeze."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldseg.errors import OutputError
from ldseg.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint, state_tensors, tensors_hash
from ldseg.runtime.artifacts.source import demo_checkpoint_path
from ldseg.training import OptionsError, TrainOptions, train
from ldseg.training.state import RunPaths

AE = ("label_encoder", "label_decoder")


def _options(out: Path, **changes: object) -> TrainOptions:
    base = TrainOptions(
        preset="demo", data="phantoms", output=out, batch_size=2, num_train=2, val=0, steps=2, progress=False
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _component(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An autoencoder-only run: 6 steps on one fixed batch of two phantoms."""
    out = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    train(_options(out, steps=6, autoencoder_steps=6, val=1))
    return out


def test_autoencoder_loss_decreases(autoencoder: Path) -> None:
    rows = _rows(RunPaths.beside(autoencoder).metrics_csv)
    losses = [float(r["loss"]) for r in rows]
    assert [r["phase"] for r in rows] == ["autoencoder"] * 6
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, f"loss went {first:.4f} -> {last:.4f}: {losses}"


def test_autoencoder_only_run_flags(autoencoder: Path) -> None:
    meta = read_metadata(autoencoder)
    assert meta["trained"] == {"label_encoder": True, "label_decoder": True, "image_encoder": False, "denoiser": False}
    assert meta["training"]["step"] == 6
    summary = json.loads(RunPaths.beside(autoencoder).metrics_json.read_text())
    assert summary["epochs"][-1]["val_recon_dice"].keys() == {"1", "2", "mean"}


def test_checkpoint_reloads_bit_identically(autoencoder: Path, tmp_path: Path) -> None:
    paths = RunPaths.beside(autoencoder)
    model = load_checkpoint(autoencoder)
    tensors = state_tensors(model)
    assert tensors_hash(tensors) == read_metadata(autoencoder)["content_sha256"] == model.checkpoint_hash
    # The sidecar holds the raw weights and the EMA denoiser: the checkpoint is exactly those.
    state = load_file(str(paths.state))
    for name, value in tensors.items():
        source = f"ema.{name[len('denoiser.') :]}" if name.startswith("denoiser.") else f"model.{name}"
        assert torch.equal(value, state[source]), name
    # Saving the reloaded model again gives the same bytes-level content.
    again = tmp_path / "again.safetensors"
    assert save_checkpoint(model, again, overwrite=False) == model.checkpoint_hash
    reloaded = state_tensors(load_checkpoint(again))
    assert all(torch.equal(reloaded[k], tensors[k]) for k in tensors)


def test_joint_loss_decreases_on_a_fixed_batch(tmp_path: Path) -> None:
    # One phantom, official joint loss from step 0. Its segmentation term is what falls fast at
    # this scale (the noise MSE needs far longer), so compare that.
    train(_options(tmp_path / "j.safetensors", steps=6, batch_size=1, num_train=1, lr=2e-3))
    rows = _rows(RunPaths.beside(tmp_path / "j.safetensors").metrics_csv)
    assert {r["phase"] for r in rows} == {"joint"}
    seg = [float(r["loss_seg"]) for r in rows]
    first, last = sum(seg[:3]) / 3, sum(seg[-3:]) / 3
    assert last < 0.95 * first, f"segmentation loss went {first:.4f} -> {last:.4f}: {seg}"


def test_resume_continues_and_matches_an_uninterrupted_run(autoencoder: Path, tmp_path: Path) -> None:
    common = {"init": autoencoder, "freeze": "autoencoder", "noise_draws": 2}
    whole = train(_options(tmp_path / "whole.safetensors", steps=3, **common))
    part = train(_options(tmp_path / "part.safetensors", steps=1, **common))
    assert part.step == 1
    resumed = train(_options(tmp_path / "part.safetensors", steps=3, resume=True, **common))
    assert resumed.step == 3 and resumed.total_steps == 3
    rows = _rows(resumed.metrics_csv)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert read_metadata(resumed.checkpoint)["training"]["step"] == 3
    # Each step is a pure function of (state, seed, step): bit-identical on CPU.
    assert resumed.content_sha256 == whole.content_sha256
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(whole.metrics_csv)]


def test_resume_refuses_changed_options(autoencoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    train(_options(out, steps=1, init=autoencoder, freeze="autoencoder"))
    with pytest.raises(OptionsError, match="seed"):
        train(_options(out, steps=2, init=autoencoder, freeze="autoencoder", seed=1, resume=True))


def test_freeze_keeps_autoencoder_weights(autoencoder: Path, tmp_path: Path) -> None:
    result = train(_options(tmp_path / "f.safetensors", steps=2, init=autoencoder, freeze="autoencoder", val=1))
    before = load_file(str(autoencoder))
    after = load_file(str(result.checkpoint))
    for prefix in AE:  # weights and batch-norm statistics alike
        part = _component(before, prefix)
        assert part and all(torch.equal(after[k], v) for k, v in part.items()), prefix
    for prefix in ("image_encoder", "denoiser"):
        part = _component(before, prefix)
        assert any(not torch.equal(after[k], v) for k, v in part.items()), f"{prefix} did not train"
    assert result.trained == {"label_encoder": True, "label_decoder": True, "image_encoder": True, "denoiser": True}
    assert result.val_dice is not None and set(result.val_dice) == {"1", "2", "mean"}


def test_freeze_needs_a_trained_autoencoder(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="--freeze autoencoder needs --init"):
        train(_options(tmp_path / "x.safetensors", freeze="autoencoder"))


def test_freeze_encoders_needs_a_trained_image_encoder(autoencoder: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="untrained: image_encoder"):
        train(_options(tmp_path / "x.safetensors", init=autoencoder, freeze="encoders"))


def test_freeze_encoders_trains_only_the_denoiser(tmp_path: Path) -> None:
    """The knee recipe's mode: all three encoders/decoder frozen, latents cached once per
    (sample, flips), the denoiser's noise MSE falls; checkpoints every N steps, not per epoch."""
    out = tmp_path / "d.safetensors"
    result = train(
        _options(
            out,
            steps=8,
            init=demo_checkpoint_path(),
            freeze="encoders",
            batch_size=2,
            num_train=2,
            noise_draws=8,
            flips=True,
            checkpoint_every=4,
            lr=3e-3,
        )
    )
    before, after = load_file(str(demo_checkpoint_path())), load_file(str(result.checkpoint))
    for prefix in (*AE, "image_encoder"):
        part = _component(before, prefix)
        assert part and all(torch.equal(after[k], v) for k, v in part.items()), prefix
    assert any(not torch.equal(after[k], v) for k, v in _component(before, "denoiser").items())
    rows = _rows(result.metrics_csv)
    assert {r["phase"] for r in rows} == {"denoiser"}
    summary = json.loads(result.metrics_json.read_text())
    assert [e["step"] for e in summary["epochs"]] == [4, 8]


def test_existing_output_is_refused_before_training(tmp_path: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"not yours")
    with pytest.raises(OutputError, match="exists"):
        train(_options(out))
    assert out.read_bytes() == b"not yours"


def test_options_are_validated() -> None:
    with pytest.raises(OptionsError, match="--steps"):
        TrainOptions(preset="demo", data="phantoms", output=Path("x.safetensors"), steps=0)
    with pytest.raises(OptionsError, match="--noise-draws"):
        TrainOptions(preset="demo", data="phantoms", output=Path("x.safetensors"), noise_draws=4)
    with pytest.raises(OptionsError, match="--resume"):
        TrainOptions(preset="demo", data="phantoms", output=Path("x.safetensors"), resume=True, overwrite=True)


def test_folder_data_trains(tmp_path: Path) -> None:
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for name, seed in (("case1", 1), ("case2", 2), ("case3", 3)):
        write_phantom_nifti(
            make_phantom(seed, shape=(20, 40, 40)),
            data / "images" / f"{name}.nii.gz",
            data / "labels" / f"{name}.nii.gz",
            overwrite=False,
        )
    result = train(_options(tmp_path / "folder.safetensors", data=str(data), steps=1, val=1))
    summary = json.loads(result.metrics_json.read_text())
    assert summary["train_samples"] == 2 and summary["val_samples"] == 1  # last pair by name held out
    assert result.val_dice is not None


def test_evaluate_demo_reports_per_seed_and_class(autoencoder: Path) -> None:
    from ldseg.training import evaluate_demo

    report = evaluate_demo(load_checkpoint(autoencoder), seeds=[0], steps=2)
    assert report["seeds"] == [0]
    assert set(report["per_class"]) == {"1", "2"} and set(report["per_seed"][0]["dice"]) == {"1", "2"}
    assert 0.0 <= report["mean"] <= 1.0
