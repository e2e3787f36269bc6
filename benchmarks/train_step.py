"""Issue 32's CPU training step: what one step of `scripts/knee_recipe.sh` costs (knee3d denoiser,
--freeze encoders, --batch-size 3 --noise-draws 16: 48 latents of 1x8x8x16 per step), and what each
cheap change takes off. Not a test: it prints and writes what it measured.

    python benchmarks/train_step.py --steps 6 -o benchmarks/results/<machine>/train-step

Variants, run alternately step by step in one process (a busy machine slows them alike):
- written-out GroupNorm: the mean/variance form that inference and export use, in training too
  (what `ldseg-train` ran before it switched to PyTorch's fused group_norm for training);
- fused GroupNorm: `F.group_norm`, what `ldseg-train` runs now;
each with the trainer's channels-last Conv3d weights (`_prefer_channels_last`, applied on CPU) and
without. The first step of each variant is a warm-up and not counted. Random weights and latents:
the cost does not depend on the values. Losses are printed so equal work is visible.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ldseg.model.config import get_preset
from ldseg.model.diffusion import alpha_bar_table, q_sample
from ldseg.model.layers import GroupNorm
from ldseg.model.network import LDSeg
from ldseg.training.losses import noise_loss
from ldseg.training.trainer import _prefer_channels_last

VARIANTS = {  # name: (fused GroupNorm, channels-last weights)
    "written-out GN, channels-last (before)": (False, True),
    "fused GN, channels-last (now)": (True, True),
    "written-out GN, channels-first": (False, False),
    "fused GN, channels-first": (True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per variant (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = LDSeg(get_preset("knee3d"))
    alpha_bar = torch.as_tensor(alpha_bar_table(full.cfg.diffusion), dtype=torch.float32)
    z_l0 = torch.randn(3, 1, 8, 8, 16).repeat_interleave(16, dim=0)
    z_i = torch.randn(3, 1, 8, 8, 16).repeat_interleave(16, dim=0)
    runs = {}
    for name, (fused, channels_last) in VARIANTS.items():
        denoiser = copy.deepcopy(full.denoiser).train()
        if channels_last:
            _prefer_channels_last(denoiser)  # type: ignore[arg-type]
        for module in denoiser.modules():
            if isinstance(module, GroupNorm):
                module.train(fused)  # eval mode = the written-out form; gradients flow either way
        runs[name] = (denoiser, torch.optim.Adam(denoiser.parameters(), lr=1e-3), [], [])
    record = {"command": " ".join(sys.argv), "threads": args.threads, "load_before": os.getloadavg()[0]}
    for step in range(args.steps):
        for denoiser, optimizer, times, losses in runs.values():
            gen = torch.Generator().manual_seed(step)
            t = torch.randint(0, full.cfg.diffusion.timesteps, (z_l0.shape[0],), generator=gen)
            eps = torch.randn(z_l0.shape, generator=gen)
            clock = time.perf_counter()
            loss = noise_loss(eps, denoiser(q_sample(z_l0, t, eps, alpha_bar), z_i, t))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - clock)
            losses.append(float(loss.detach()))
    record["load_after"] = os.getloadavg()[0]
    before = statistics.median(runs[next(iter(VARIANTS))][2][1:])
    lines = [
        f"`{record['command']}` (torch {torch.__version__}, {args.threads} threads; "
        f"load {record['load_before']:.2f} before, {record['load_after']:.2f} after)",
        "",
        "| variant | median s/step | vs before | first losses |",
        "| --- | --- | --- | --- |",
    ]
    variants = {}
    for name, (_, _, times, losses) in runs.items():
        median = statistics.median(times[1:])
        variants[name] = {"step_s": times, "median_s": median, "losses": losses}
        shown = ", ".join(f"{v:.5f}" for v in losses[:3])
        lines.append(f"| {name} | {median:.3f} | {median / before:.2f}x | {shown} |")
    record["variants"] = variants
    print("\n".join(lines))
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"train-step-{args.threads}t.json").write_text(json.dumps(record, indent=2))
        (args.output / f"train-step-{args.threads}t.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
