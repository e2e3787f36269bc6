"""What a training run is asked to do (TrainOptions) and what it produced (TrainResult)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ldseg.errors import LdsegError

Freeze = Literal["none", "autoencoder", "encoders"]
LrSchedule = Literal["constant", "cosine"]

# Options that must not change when a run is resumed: they define the data order, the noise draws
# and which components train, so changing them would silently make a different run.
RESUME_FIXED = (
    "preset",
    "data",
    "freeze",
    "batch_size",
    "seed",
    "num_train",
    "val",
    "autoencoder_steps",
    "noise_draws",
    "augment",
    "flips",
)


class OptionsError(LdsegError):
    """Training options that contradict each other or the checkpoint they refer to (usage error)."""

    exit_code = 2


@dataclass(frozen=True)
class TrainOptions:
    """One training run; mirrors `ldseg-train` (and `python -m ldseg.training`).

    CLI flags (field in brackets):
      --preset knee3d|glas2d|demo   [preset]       model configuration to train
      --data DIR|phantoms           [data]         DIR/images/NAME.nii.gz + DIR/labels/NAME.nii.gz
                                                   (paired by file name, see data.find_pairs), or
                                                   `phantoms`: synthetic phantoms, made on the fly
      -o, --output CHECKPOINT       [output]       .safetensors checkpoint; training state, metrics
                                                   CSV and JSON are written beside it
      --init CHECKPOINT             [init]         start from these weights (components keep their
                                                   `trained` flags)
      --freeze autoencoder          [freeze]       train only image encoder + denoiser, on cached
                                                   label latents (needs --init with a trained
                                                   label encoder/decoder)
      --freeze encoders                            train only the denoiser, on cached label AND
                                                   image latents (needs --init with all three
                                                   trained, e.g. the imported official weights);
                                                   intensity augmentation does not apply (the
                                                   image latents are computed once), flips do
      --steps N                     [steps]        optimizer steps in total (wins over --epochs)
      --epochs N                    [epochs]       passes over the training set (default 10)
      --batch-size B                [batch_size]   images per step (default 2)
      --lr LR                       [lr]           Adam learning rate (official 1e-3)
      --device auto|cpu|cuda[:N]    [device]       auto (default): cuda when PyTorch sees a GPU,
                                                   else cpu; deterministic (bit-reproducible) on
                                                   cpu only
      --resume                      [resume]       continue the run saved at --output
      --seed S                      [seed]         weights init, data order, noise, augmentation
      --overwrite                   [overwrite]    replace an existing --output
      --num-train N                 [num_train]    phantoms per epoch (seeds 10000..10000+N-1)
      --val N                       [val]          validation samples (phantom seeds 9000.., or
                                                   the last N folder pairs by name); 0: none

    Staging and schedule:
      --autoencoder-steps N [autoencoder_steps]: the first N steps train the label autoencoder
          alone (CE + 2*(1 - Dice) on decoder(encoder(label))); later steps use the official joint
          loss. N == total steps gives an autoencoder-only run, to be continued with
          --init ... --freeze autoencoder.
      --checkpoint-every N [checkpoint_every]: validate and save every N steps (default: once
          per epoch; with a handful of volumes an epoch is a few steps).
      --noise-draws K [noise_draws]: with --freeze, K (t, noise) draws per image per
          step; the image encoder (the expensive part) runs once and its latent is shared.
      --lr-schedule constant|cosine [lr_schedule]: cosine decays to 0 over each phase.
      --ema-decay D [ema_decay], --no-augment [augment], --flips [flips], --no-progress [progress].
    """

    preset: str
    data: str
    output: Path
    init: Path | None = None
    freeze: Freeze = "none"
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 2
    lr: float = 1e-3
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    overwrite: bool = False
    num_train: int = 256
    val: int = 4
    autoencoder_steps: int = 0
    noise_draws: int = 1
    checkpoint_every: int | None = None
    lr_schedule: LrSchedule = "constant"
    ema_decay: float = 0.999
    augment: bool = True  # intensity scale/shift after min-max
    flips: bool = False  # random flips along each spatial axis
    progress: bool = True  # Rich progress bar and per-epoch lines

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.init is not None:
            object.__setattr__(self, "init", Path(self.init))
        problems = []
        if self.freeze not in ("none", "autoencoder", "encoders"):
            problems.append(f"--freeze must be 'autoencoder' or 'encoders' (or none), got {self.freeze!r}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.num_train < 1:
            problems.append(f"--num-train must be >= 1, got {self.num_train}")
        if self.val < 0:
            problems.append(f"--val must be >= 0, got {self.val}")
        if self.autoencoder_steps < 0:
            problems.append(f"--autoencoder-steps must be >= 0, got {self.autoencoder_steps}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            problems.append(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.autoencoder_steps and self.freeze != "none":
            problems.append("--autoencoder-steps trains the autoencoder; it cannot be frozen too")
        if self.noise_draws < 1:
            problems.append(f"--noise-draws must be >= 1, got {self.noise_draws}")
        if self.noise_draws > 1 and self.freeze == "none":
            problems.append("--noise-draws > 1 needs --freeze (latent-space training)")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.resume and self.overwrite:
            problems.append("--resume continues the run at --output; it cannot be combined with --overwrite")
        if problems:
            raise OptionsError("; ".join(problems))

    def to_json_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output"] = str(self.output)
        out["init"] = None if self.init is None else str(self.init)
        return out


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    state: Path  # training-state sidecar (for --resume)
    metrics_csv: Path
    metrics_json: Path
    step: int  # optimizer steps done, resumed ones included
    total_steps: int
    content_sha256: str
    final_loss: float  # mean training loss over the last epoch's steps (this process)
    val_dice: dict[str, float] | None  # last validation: per foreground class + "mean"
    trained: dict[str, bool]
    wall_time_s: float
    device: str = "cpu"  # where it trained (--device auto resolved)
