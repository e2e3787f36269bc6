"""What torch.compile costs and gives the three stages the torch backend compiles (the image encoder,
one denoiser step and the decoder, in the lean form ldseg-run runs), and what Inductor's cache in the
project's cache folder saves a second process (issue 31: "compile paid once per model"). Not a test:
it prints and writes what it measured.

    python benchmarks/compile_stages.py --checkpoint work/knee/knee3d.safetensors [--device cuda] \
        [--precision bf16] -o benchmarks/results/<machine>/compile-stages

Two fresh processes, one after the other, share one cache root (a new temporary LDSEG_CACHE unless
--cache): the first compiles, the second should only load. Each gives, per stage: the eager call
(median of --repeat after one warm-up), the first compiled call (compiling or loading, plus one run),
the compiled call (median of --repeat), the largest difference to eager, and Inductor's FX-graph cache
hits and misses. Stages run through the backend's own wrapper (`Compiled`) under its numerics (TF32
off; autocast for bf16/fp16). On CUDA the times are CUDA events; on the CPU, where the backend does
not compile (it would not pay there: see the results), wall time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = ("encoder", "denoiser", "decoder")


def _timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """fn's result and its seconds (CUDA events on a GPU)."""
    import torch

    if not device.startswith("cuda"):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, begin.elapsed_time(end) / 1000


def measure(checkpoint: Path, device: str, precision: str, repeat: int) -> dict[str, Any]:
    """One process's numbers: every stage eager, then compiled."""
    import torch
    from torch._dynamo.utils import counters

    from ldseg.model.checkpoint import load_checkpoint
    from ldseg.model.sampling import sampler_table
    from ldseg.runtime.backends.torch.backend import TorchBackend
    from ldseg.runtime.backends.torch.compile import INDUCTOR_CACHE_ENV, Compiled

    backend = TorchBackend(load_checkpoint(checkpoint), device=device, precision=precision, lean=True)
    model, cfg = backend.model, backend.config
    torch.manual_seed(0)
    z = torch.randn(1, *cfg.latent_shape, device=backend.device)
    row = torch.as_tensor(sampler_table(cfg.diffusion, 15).rows[0], dtype=torch.float32, device=backend.device)
    stages = {
        "encoder": (model.encode_image, (torch.rand(1, *cfg.image_shape, device=backend.device),)),
        "denoiser": (model.step, (z, torch.randn_like(z), row.expand(1, 4), torch.randn_like(z))),
        "decoder": (model.label_decoder, (z,)),
    }
    results: dict[str, Any] = {"device": backend.device, "precision": precision, "form": backend.form}
    with torch.inference_mode(), backend.numerics():
        for name in STAGES:
            fn, args = stages[name]
            call = functools.partial(fn, *args)
            eager, _ = _timed(call, device)  # the warm-up
            eager_s = statistics.median(_timed(call, device)[1] for _ in range(repeat))
            before = dict(counters["inductor"])
            compiled = functools.partial(Compiled(name, fn, enabled=True), *args)
            out, first_s = _timed(compiled, device)
            compiled_s = statistics.median(_timed(compiled, device)[1] for _ in range(repeat))
            after = counters["inductor"]
            results[name] = {
                "eager_s": eager_s,
                "first_compiled_call_s": first_s,
                "compiled_s": compiled_s,
                "max_abs_difference": (out.float() - eager.float()).abs().max().item(),
                "fallback": compiled.func.failed,
                **{k: after.get(k, 0) - before.get(k, 0) for k in ("fxgraph_cache_miss", "fxgraph_cache_hit")},
            }
    results["inductor_cache"] = os.environ.get(INDUCTOR_CACHE_ENV)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, help="the cache root both processes share (default: a new temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.checkpoint, args.device, args.precision, args.repeat)))
        return
    with tempfile.TemporaryDirectory(prefix="ldseg-compile-") as temporary:
        cache = args.cache or Path(temporary)
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # ldseg's choice, measured
        env.update({"LDSEG_CACHE": str(cache), "PYTHONUTF8": "1"})
        command = [sys.executable, __file__, "--child", "--checkpoint", str(args.checkpoint), "--device", args.device]
        command += ["--precision", args.precision, "--repeat", str(args.repeat)]
        runs = []
        for process in ("first", "second"):
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                sys.exit(f"the {process} process failed:\n{done.stderr[-3000:]}")
            runs.append({"process": process, **json.loads(done.stdout.strip().splitlines()[-1])})
    lines = [
        f"`{' '.join(sys.argv)}` ({runs[0]['device']}, {args.precision}, {runs[0]['form']} form)",
        "",
        "| process | stage | eager | first compiled call | compiled | speed-up | max abs diff | FX cache miss / hit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        for name in STAGES:
            r = run[name]
            lines.append(
                f"| {run['process']} | {name} | {r['eager_s'] * 1000:.1f} ms | {r['first_compiled_call_s']:.1f} s "
                f"| {r['compiled_s'] * 1000:.1f} ms | {r['eager_s'] / r['compiled_s']:.2f}x "
                f"| {r['max_abs_difference']:.2e} | {r['fxgraph_cache_miss']} / {r['fxgraph_cache_hit']}"
                + (f" (fell back: {r['fallback']})" if r["fallback"] else "")
                + " |"
            )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "compile_stages.json").write_text(json.dumps(runs, indent=1) + "\n")
        (args.output / "compile_stages.md").write_text(table + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
