"""Issue 31's lean step, measured: the denoiser's GroupNorms as one op each (ldseg/model/layers.py,
GroupNorm.fused) against the written-out statistics. Not a test: it prints and writes what it measured.

    python benchmarks/denoiser_norms.py --checkpoint work/knee/official.safetensors \
        --before <bundle exported before the change> --after <bundle exported with it> --batch 1 8 \
        -o benchmarks/results/<machine>/denoiser-norms

- nodes: `denoise_step.onnx` of each bundle, as exported and after ONNX Runtime's own CPU optimizer
  (ORT_ENABLE_ALL, the backend's level);
- ONNX Runtime CPU: one step of each bundle per --batch, 10-run blocks alternated, median;
- PyTorch eager: the checkpoint's denoiser with its GroupNorms fused or written out, alternated, median,
  and the largest difference between the two outputs;
- with --image and --label (a knee case, and a trained denoiser in --checkpoint): the whole volume
  segmented by the torch backend (CPU) both ways: Dice per class and the voxels whose labels differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ldseg.model.checkpoint import load_checkpoint
from ldseg.model.layers import GroupNorm

BLOCK, BLOCKS = 10, 15


def nodes(bundle: Path) -> dict[str, Any]:
    path = bundle / "denoise_step.onnx"
    exported = onnx.load(str(path), load_external_data=False).graph.node
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_free_dimension_override_by_name("batch", 1)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
    counts = Counter(n.op_type for n in exported)
    return {"exported": len(exported), "after_ort": len(optimized), "ops": dict(counts.most_common(10))}


def step_session(bundle: Path, batch: int) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_free_dimension_override_by_name("batch", batch)
    session = ort.InferenceSession(str(bundle / "denoise_step.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        i.name: rng.standard_normal([batch if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
        for i in session.get_inputs()
    }
    return session, feeds


def alternate(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median ms per call of each callable, 10-call blocks alternated after 5 warm-up calls each."""
    for run in runs.values():
        for _ in range(5):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(BLOCKS):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(BLOCK):
                run()
            times[name].append((time.perf_counter() - start) / BLOCK * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def segment_both_ways(args: argparse.Namespace) -> dict[str, Any]:
    import nibabel as nib

    from ldseg.api import Segmenter
    from ldseg.metrics import dice_per_class

    truth = np.asarray(nib.load(args.label).dataobj).astype(np.uint8)
    labels, dice = {}, {}
    with Segmenter(checkpoint=args.checkpoint, backend="torch", device="cpu") as seg:
        norms = [m for m in seg.backend.model.denoiser.modules() if isinstance(m, GroupNorm)]  # type: ignore[attr-defined]
        for name, fused in (("written-out", False), ("fused", True)):
            for norm in norms:
                norm.fused = fused
            [result] = seg.segment(args.image)
            labels[name] = np.asarray(result.labels)
            scores = dice_per_class(labels[name], truth, seg.config.num_classes)
            dice[name] = " / ".join(f"{scores[c]:.4f}" for c in sorted(scores))
    differing = int((labels["fused"] != labels["written-out"]).sum())
    return {"dice": dice, "differing": differing, "voxels": int(truth.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--image", type=Path, help="a volume to segment both ways (with --label)")
    parser.add_argument("--label", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    record: dict[str, Any] = {"command": " ".join(sys.argv), "load_before": os.getloadavg()[0]}
    n = {"before": nodes(args.before), "after": nodes(args.after)}
    record["nodes"] = n
    ort_ms = {}
    for batch in args.batch:
        sessions = {name: step_session(path, batch) for name, path in (("before", args.before), ("after", args.after))}
        ort_ms[batch] = alternate({name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f) in sessions.items()})
    record["onnxruntime_step_ms"] = ort_ms
    model = load_checkpoint(args.checkpoint).eval()
    norms = [m for m in model.denoiser.modules() if isinstance(m, GroupNorm)]
    shape = (1, 1, *model.cfg.latent_shape[1:])
    z, z_image, t = torch.randn(shape), torch.randn(shape), torch.full((1,), 500.0)

    def denoise(fused: bool) -> torch.Tensor:
        for norm in norms:
            norm.fused = fused
        return model.denoiser(z, z_image, t)

    with torch.inference_mode():
        difference = float((denoise(True) - denoise(False)).abs().max())
        torch_ms = alternate({"written-out": lambda: denoise(False), "fused": lambda: denoise(True)})
    record["torch_denoiser_ms"] = torch_ms
    record["torch_max_abs_difference"] = difference
    agreement = segment_both_ways(args) if args.image and args.label else None
    record["volume"] = agreement
    record["load_after"] = os.getloadavg()[0]
    lines = [
        f"`{record['command']}` (load {record['load_before']:.2f} before, {record['load_after']:.2f} after)",
        "",
        "| what | written-out GroupNorms | fused (one op each) | ratio |",
        "| --- | --- | --- | --- |",
        f"| denoise_step nodes, exported | {n['before']['exported']} | {n['after']['exported']} | "
        f"{n['after']['exported'] / n['before']['exported']:.2f} |",
        f"| denoise_step nodes, after ONNX Runtime's CPU optimizer | {n['before']['after_ort']} | "
        f"{n['after']['after_ort']} | {n['after']['after_ort'] / n['before']['after_ort']:.2f} |",
    ]
    for batch, ms in ort_ms.items():
        lines.append(
            f"| ONNX Runtime CPU step, batch {batch}, ms | {ms['before']:.2f} | {ms['after']:.2f} | "
            f"{ms['after'] / ms['before']:.3f} |"
        )
    lines.append(
        f"| PyTorch eager denoiser, batch 1, ms | {torch_ms['written-out']:.2f} | {torch_ms['fused']:.2f} | "
        f"{torch_ms['fused'] / torch_ms['written-out']:.3f} |"
    )
    if agreement is not None:
        dice = agreement["dice"]
        lines.append(
            f"| {args.image.name} segmented (torch CPU): Dice per class | {dice['written-out']} | {dice['fused']} | |"
        )
        lines.append(
            f"| voxels whose labels differ | | {agreement['differing']} of {agreement['voxels']} "
            f"({100 * agreement['differing'] / agreement['voxels']:.5f} %) | |"
        )
    lines.append(f"\nmedians of {BLOCKS} blocks of {BLOCK} calls, alternated; torch outputs differ by {difference:.1e}")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "denoiser_norms.json").write_text(json.dumps(record, indent=2))
    (args.output / "denoiser_norms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
