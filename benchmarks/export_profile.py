"""Where one graph's export goes: cProfile of `trace_graph` (torch.export, the translation to ONNX,
ldseg's optimizer, the checks; the decomposition re-trace when ldseg.export.lean_exporter does not
skip it) for one network of a checkpoint, after an untimed export of the encoder (imports and
first-use costs). Prints the cumulative times of the exporter's phases. Issue 32's profiles (demo
denoiser, 2-core Zen 1): before the lean exporter, 22.0 s under the profiler under load: torch.export
capture 4.1 s, run_decompositions 8.8 s, translation 1.6 s, ldseg.export.optimize 3.8 s; with it
(2026-12-05, quiet), 7.9 s: capture 4.2 s, no decomposition, translation 1.0 s, optimize 2.3 s
(profiler overhead included; 3.4 s without the profiler, benchmarks/export_speed.py).

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
