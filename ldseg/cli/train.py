"""`ldseg-train` (also `python -m ldseg.training`): the official recipe and its staged variants on
NIfTI pairs or phantoms; a thin layer over ldseg.training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ldseg.cli.common import FreezeChoice, LrScheduleChoice, PresetChoice, VersionOption, entry, out, plain

train_typer = typer.Typer(add_completion=False, help="Train LDSeg (official recipe) on NIfTI pairs or phantoms.")


@train_typer.command()
def train(
    preset: Annotated[PresetChoice, typer.Option(help="Model configuration to train.")],
    data: Annotated[str, typer.Option(help="DIR with images/NAME.nii.gz + labels/NAME.nii.gz, or 'phantoms'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write (.safetensors).")],
    init: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint.")] = None,
    freeze: Annotated[
        FreezeChoice,
        typer.Option(
            help="'autoencoder': train image encoder + denoiser; 'encoders': the denoiser alone (latents cached)."
        ),
    ] = FreezeChoice.none,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (wins over --epochs).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 2,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lr_schedule: Annotated[LrScheduleChoice, typer.Option(help="Cosine decays to 0 over each phase.")] = (
        LrScheduleChoice.constant
    ),
    autoencoder_steps: Annotated[int, typer.Option(help="First N steps train the label autoencoder alone.")] = 0,
    noise_draws: Annotated[int, typer.Option(help="With --freeze: (t, noise) draws per image per step.")] = 1,
    checkpoint_every: Annotated[
        Optional[int], typer.Option(help="Validate and save every N steps (default: each epoch).")
    ] = None,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the weights that are sampled, in [0, 1).")] = 0.999,
    augment: Annotated[bool, typer.Option(help="Intensity augmentation of the images.")] = True,
    flips: Annotated[bool, typer.Option(help="Random flips along each spatial axis.")] = False,
    num_train: Annotated[int, typer.Option(help="Phantoms per epoch (with --data phantoms).")] = 256,
    val: Annotated[int, typer.Option(help="Validation samples (0: none).")] = 4,
    device: Annotated[
        str, typer.Option(help="auto (a GPU when PyTorch sees one, else cpu) | cpu | cuda[:N]; bit-reproducible on cpu")
    ] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
    seed: Annotated[int, typer.Option(help="Weights, data order, noise and augmentation seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run saved at --output.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    version: VersionOption = None,
) -> None:
    """Example (the bundled demo model, see README):
    ldseg-train --preset demo --data phantoms -o ae.safetensors --steps 400 --autoencoder-steps 400"""
    import torch

    from ldseg.training import TrainOptions
    from ldseg.training.trainer import train as run_training

    if threads:
        torch.set_num_threads(threads)
    given = locals()  # every option is a TrainOptions field of the same name (so the two cannot drift)
    options = TrainOptions(**{f.name: plain(given[f.name]) for f in dataclasses.fields(TrainOptions)})
    result = run_training(options)
    out.print_json(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint),
                "device": result.device,
                "step": result.step,
                "val_dice": result.val_dice,
                "trained": result.trained,
                "content_sha256": result.content_sha256,
                "wall_time_s": round(result.wall_time_s, 1),
            }
        )
    )


main = entry(train_typer, "ldseg-train")
