"""`python -m ldseg.training`: the same options as `ldseg-train`, parsed with argparse.

How the bundled demo model (ldseg/data/demo.safetensors) was made, on a 2-core CPU:

  # stage 1: label autoencoder alone (CE + 2 * (1 - Dice) on decoder(encoder(label)))
  python -m ldseg.training --preset demo --data phantoms -o RUN/ae.safetensors \
      --steps 400 --autoencoder-steps 400 --batch-size 4 --num-train 256 --val 4 \
      --lr 2e-3 --lr-schedule cosine --seed 0 --threads 2
  # stage 2: image encoder + denoiser on the frozen autoencoder's cached label latents
  python -m ldseg.training --preset demo --data phantoms -o RUN/demo.safetensors \
      --init RUN/ae.safetensors --freeze autoencoder --steps 1500 --batch-size 2 \
      --noise-draws 16 --num-train 512 --val 4 --lr 2e-3 --lr-schedule cosine --seed 0 --threads 2

Why two stages rather than the official joint loss from step 0: on a CPU the joint step pays for
full-resolution label encoding, decoding and image encoding at once, and its segmentation term
decodes z_lt - eps_hat, which is not the latent the sampler hands the decoder. A converged
autoencoder first, then latent diffusion on cached latents (the standard latent-diffusion order),
reaches the demo's Dice target in a fraction of the time; the joint recipe stays available
(the default when neither --autoencoder-steps nor --freeze is given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldseg.errors import LdsegError
from ldseg.training.options import TrainOptions
from ldseg.training.trainer import train


def parse(argv: list[str] | None = None) -> tuple[TrainOptions, int | None]:
    p = argparse.ArgumentParser(prog="python -m ldseg.training", description=TrainOptions.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=["knee3d", "glas2d", "demo"])
    p.add_argument("--data", required=True, help="DIR (DIR/images + DIR/labels) or 'phantoms'")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--init", type=Path)
    p.add_argument("--freeze", choices=["autoencoder", "encoders"])
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--autoencoder-steps", type=int, default=0)
    p.add_argument("--noise-draws", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--flips", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    a = p.parse_args(argv)
    options = TrainOptions(
        preset=a.preset, data=a.data, output=a.output, init=a.init, freeze=a.freeze or "none",
        steps=a.steps, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, device=a.device,
        resume=a.resume, seed=a.seed, overwrite=a.overwrite, num_train=a.num_train, val=a.val,
        autoencoder_steps=a.autoencoder_steps, noise_draws=a.noise_draws, lr_schedule=a.lr_schedule,
        checkpoint_every=a.checkpoint_every,
        ema_decay=a.ema_decay, augment=not a.no_augment, flips=a.flips, progress=not a.no_progress,
    )
    return options, a.threads


def main(argv: list[str] | None = None) -> int:
    try:
        options, threads = parse(argv)
        if threads:
            torch.set_num_threads(threads)
        result = train(options)
    except LdsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"checkpoint": str(result.checkpoint), "step": result.step, "val_dice": result.val_dice,
                      "trained": result.trained, "content_sha256": result.content_sha256,
                      "wall_time_s": round(result.wall_time_s, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
