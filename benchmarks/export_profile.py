"""Where one graph's export goes: cProfile of `trace_graph` (torch.export, its decomposition re-trace,
the translation to ONNX, ldseg's optimizer, the checks) for one network of a checkpoint, after an
untimed export of the encoder (imports and first-use costs). Prints the cumulative times of the
exporter's phases. Issue 32's profile, 2026-12-05 (demo denoiser, 2-core Zen 1 under load, 22.0 s
under the profiler): torch.export capture 4.1 s, run_decompositions 8.8 s, translation 1.6 s,
ldseg.export.optimize 3.8 s (onnxscript's rewriter 2.4 s, constant folding 1.2 s).

    python benchmarks/export_profile.py demo denoiser
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

from ldseg.export.onnx_export import trace_graph
from ldseg.export.specs import graph_specs
from ldseg.model.layers import folded_batchnorm, phase_upsampling
from ldseg.runtime.artifacts.source import load_model

PHASES = (
    r"(onnx_export|ldseg/export/optimize|_capture_strategies|run_decompositions|"
    r"_translate_fx_graph|rewriter/__init__|_constant_folding.py:\d+\(call\)|checker|shape_inference)"
)


def main(checkpoint: str = "demo", graph: str = "denoiser") -> int:
    warnings.simplefilter("ignore")
    model = load_model(checkpoint, needs=()).eval()  # timing: untrained parts are fine
    specs = graph_specs(model.cfg)
    with TemporaryDirectory() as scratch, phase_upsampling(model), folded_batchnorm(model):
        trace_graph(specs["encoder"], model, Path(scratch) / "warm.onnx", opset=18, batch=1)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        trace_graph(specs[graph], model, Path(scratch) / f"{graph}.onnx", opset=18, batch=1)
        profile.disable()
    print(f"{graph}: {time.perf_counter() - start:.1f} s under the profiler")
    pstats.Stats(profile).sort_stats("cumtime").print_stats(PHASES, 25)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
