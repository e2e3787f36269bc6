"""One GPU verification run: every CUDA/TensorRT path ldseg has, checked in minutes, into one JSON.

    bash scripts/gpu_check.sh --prepare              # on any CPU machine: bundles, phantoms, wheels
    bash scripts/gpu_check.sh --output DIR           # on the GPU machine: no network, within --budget-s

`--prepare` writes a git-ignored folder (default work/gpu-check) that travels with the working
tree: the demo model's FP32, FP16 and INT8 bundles, the phantoms (images + truth, so the GPU
machine needs neither scipy nor nibabel for them) and wheels of small pure dependencies the GPU
machine may lack (scripts/gpu_check.sh installs the missing ones from there, offline).

The run checks, each into the report as pass / fail / "not run: <reason>", with its numbers:
- cuda_layer: ldseg/runtime/backends/tensorrt/cuda.py (cuda-python) captures copies into a graph, relaunches it on
  changed inputs, and a deliberately broken capture ends with a reason and an eager run;
- torch_graph, torch_broken_capture: the torch whole-pipeline graph against eager (torch_checks.py);
- torch_bf16, torch_fp16: the torch backend's autocast precisions in one replay, each phantom's labels
  against FP32 (CPU reference and this GPU) at the accuracy gate's 99.5 %, with both end-to-end times;
  torch_bf16_compiled, the last check: the same with torch.compile (failing where a stage fell back);
- agreement of every GPU route with the torch CPU FP32 reference on the phantoms (and Dice vs truth);
- onnxruntime_cuda_graphs, tensorrt_<precision>_graphs: the same inputs with graphs on and off, a
  shape's first request (eager), its second (capturing) and a replay, max |delta p| <= 1e-6
  (compare.py): this is what catches a capture that corrupts a run (issue 26's TensorRT first-run defect);
- *_k_samples: Backend.sample with K samples within the GPU memory budget, equal to eager;
- device_volume_ops_torch / _onnxruntime / _tensorrt: each backend's pre/post-processing on the GPU
  against the CPU path, and its time on a knee-sized volume (volume_checks.py; TensorRT's engines hold
  the demo's grid, so its row checks the demo-grid cases and times nothing);
- bench: `ldseg-bench --device cuda --warmup 0` over what is available.

The budget bounds the whole run (report.py): each check gets the time left, an engine build is
skipped with the reason when too little is left, the JSON report is rewritten after every check,
and a watchdog writes it and exits when the budget runs out inside a check, so a run stopped from
outside or by the budget still reports what finished. Without a GPU it prints one line and exits 6.
"""

from __future__ import annotations

from ldseg.bench.gpu_check.cli import main, run_checks
from ldseg.bench.gpu_check.prepare import no_gpu_reason, prepare
from ldseg.bench.gpu_check.report import Report, environment
from ldseg.bench.gpu_check.torch_checks import Checks

__all__ = ["Checks", "Report", "environment", "main", "no_gpu_reason", "prepare", "run_checks"]
