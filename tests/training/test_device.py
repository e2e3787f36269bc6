"""`ldseg-train --device auto`: the GPU when PyTorch sees one, else the CPU (CUDA probe mocked: CI has no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ldseg.cli.train import train_typer
from ldseg.errors import BackendUnavailable
from ldseg.training import OptionsError, TrainOptions, TrainResult
from ldseg.training.trainer import resolve_device


@pytest.mark.parametrize("visible, expected", [(True, "cuda"), (False, "cpu")])
def test_auto_is_the_gpu_when_pytorch_sees_one(monkeypatch: pytest.MonkeyPatch, visible: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: never moved to the GPU


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_auto_is_the_default_and_bad_devices_are_refused() -> None:
    assert TrainOptions(preset="demo", data="phantoms", output=Path("x.safetensors")).device == "auto"
    with pytest.raises(OptionsError, match="--device must be auto, cpu or cuda"):
        TrainOptions(preset="demo", data="phantoms", output=Path("x.safetensors"), device="gpu")


def test_cli_passes_auto_and_reports_where_it_trained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[TrainOptions] = []

    def fake_train(options: TrainOptions) -> TrainResult:
        seen.append(options)
        device = str(resolve_device(options.device))
        paths = [tmp_path / n for n in ("c", "s", "m.csv", "m.json")]
        return TrainResult(*paths, 1, 1, "0" * 64, 0.0, None, {}, 0.1, device)  # type: ignore[arg-type]

    monkeypatch.setattr("ldseg.training.trainer.train", fake_train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = ["--preset", "demo", "--data", "phantoms", "-o", str(tmp_path / "x.safetensors"), "--no-progress"]
    result = CliRunner().invoke(train_typer, args)
    assert result.exit_code == 0, result.output
    assert seen[0].device == "auto"
    assert json.loads(result.stdout)["device"] == "cuda"


def test_a_run_on_auto_without_a_gpu_trains_on_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ldseg.training import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = TrainOptions(
        preset="demo", data="phantoms", output=tmp_path / "ae.safetensors", num_train=1, batch_size=1, val=0,
        steps=1, autoencoder_steps=1, progress=False,
    )  # fmt: skip
    result = train(options)
    assert result.device == "cpu"
    assert json.loads(result.metrics_json.read_text())["device"] == "cpu"
