"""What one denoiser step launches, in the official and the lean form (issue 31: the step is
launch-bound on a GPU). Not a test: it prints and writes what it counted.

    python benchmarks/step_kernels.py --preset knee3d [--device cuda] -o benchmarks/results/<machine>/step-kernels

On CUDA: the kernels one fused step (denoiser + sampler update) launches, from the PyTorch profiler's
device events, and the step's median time over 50 eager runs (CUDA events). On the CPU, where there
are no kernels: the ATen operators the step dispatches, views left out (each is at least one kernel
on a GPU; a convolution or a GroupNorm may be two or three). Weights are random: neither the count
nor the time depends on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg
from ldseg.model.rewrites import make_lean
from ldseg.runtime.backends.torch.backend import strict_fp32


class _OpLog(TorchDispatchMode):
    """The ATen operators a call dispatches, views and metadata-only ones left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not func.is_view and func.name() not in METADATA_ONLY:
            self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))


METADATA_ONLY = {"aten::empty.memory_format", "aten::empty_strided", "aten::detach", "aten::lift_fresh"}


def step_inputs(model: LDSeg, device: str) -> tuple[torch.Tensor, ...]:
    cfg = model.cfg
    z = torch.randn(1, *cfg.latent_shape, device=device)
    coeffs = torch.tensor([[500.0, 0.9, 0.3, 0.1]], device=device)
    return z, torch.randn_like(z), coeffs, torch.randn_like(z)


def count(model: LDSeg, device: str) -> dict[str, Any]:
    args = step_inputs(model, device)
    with torch.inference_mode():
        for _ in range(3):  # warm: cuDNN's choices and the allocator settle
            model.step(*args)
        if not device.startswith("cuda"):
            with _OpLog() as log:
                model.step(*args)
            return _counted(log.ops, "ATen operators (views left out)")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.step(*args)
            torch.cuda.synchronize()
    kernels = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {**_counted(kernels, "CUDA kernels"), "step_ms_p50": _step_ms(model, args)}


def _counted(ops: Counter[str], what: str) -> dict[str, Any]:
    return {"what": what, "total": sum(ops.values()), "by_name": dict(ops.most_common())}


def _step_ms(model: LDSeg, args: tuple[torch.Tensor, ...]) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model.step(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="knee3d")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LDSeg(get_preset(args.preset)).eval().to(args.device)
    results = {"preset": args.preset, "device": args.device, "torch": torch.__version__}
    with strict_fp32():  # FP32 as the torch backend runs it: TF32 off (its cuDNN default is on)
        results["official"] = count(model, args.device)
        make_lean(model)
        results["lean"] = count(model, args.device)
    for form in ("official", "lean"):
        r = results[form]
        top = ", ".join(f"{n} {k}" for n, k in list(r["by_name"].items())[:8])
        timing = f", step p50 {r['step_ms_p50']:.2f} ms" if "step_ms_p50" in r else ""
        print(f"{form}: {r['total']} {r['what']} per step{timing} ({top}, ...)")
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "step_kernels.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.output / 'step_kernels.json'}")


if __name__ == "__main__":
    main()
