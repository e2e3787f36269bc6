"""What calibration did and what it cost: INT8 vs FP32 on held-out volumes, per graph and end to end.

Like Polygraphy's comparator, the report gives numbers, not pass/fail: per-graph max abs/rel and
mean abs error on the held-out trajectories' inputs, per-class Dice of the INT8 pipeline against
the FP32 pipeline (and of both against the ground truth when it is known), label agreement, and
which nodes stayed in FP32 and why. Written as calibration.json and calibration.md in the bundle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.calibration.data import SAMPLING_SEED, CalibrationVolume, Trajectories, batches, session
from ldseg.calibration.quantize import QuantizedGraph
from ldseg.metrics import agreement, dice_per_class
from ldseg.model.sampling import draw_noise
from ldseg.runtime.artifacts.bundle import FAILED, PASSED, Bundle
from ldseg.runtime.backend import PipelineInputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

REPORT_JSON = "calibration.json"
MAX_DICE_DROP_POINTS = 1.0  # the project's INT8 target (issue 13)
MIN_DICE_VS_FP32 = 0.99
REPORT_MD = "calibration.md"


@dataclass(frozen=True)
class GraphError:
    graph: str
    samples: int
    max_abs: float
    max_rel: float  # max |int8 - fp32| / max |fp32|
    mean_abs: float
    label_agreement: float | None = None  # decoder_argmax: fraction of identical labels


@dataclass(frozen=True)
class VolumeResult:
    name: str
    dice_vs_fp32: dict[int, float]  # INT8 labels scored against FP32 labels, per foreground class
    agreement: float
    dice_fp32_vs_truth: dict[int, float] | None = None
    dice_int8_vs_truth: dict[int, float] | None = None


@dataclass
class CalibrationReport:
    bundle: Path
    source_bundle: Path
    source_hash: str
    method: str
    data: str
    calibration_volumes: list[str]
    holdout_volumes: list[str]
    samples: dict[str, int]  # calibration samples per graph
    timesteps: list[float]  # distinct t the denoise_step was calibrated at
    graphs: dict[str, QuantizedGraph]
    errors: dict[str, GraphError]
    volumes: list[VolumeResult]
    num_classes: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- summaries

    def _mean(self, values: Sequence[dict[int, float] | None]) -> dict[int, float] | None:
        present = [v for v in values if v is not None]
        if not present:
            return None
        return {c: float(np.mean([v[c] for v in present])) for c in range(1, self.num_classes)}

    @property
    def dice_vs_fp32(self) -> dict[int, float]:
        mean = self._mean([v.dice_vs_fp32 for v in self.volumes])
        assert mean is not None
        return mean

    @property
    def label_agreement(self) -> float:
        return float(np.mean([v.agreement for v in self.volumes]))

    @property
    def dice_fp32_vs_truth(self) -> dict[int, float] | None:
        return self._mean([v.dice_fp32_vs_truth for v in self.volumes])

    @property
    def dice_int8_vs_truth(self) -> dict[int, float] | None:
        return self._mean([v.dice_int8_vs_truth for v in self.volumes])

    @property
    def dice_drop_points(self) -> dict[int, float] | None:
        """FP32 Dice minus INT8 Dice vs. the truth, in Dice points (x100), per class."""
        a, b = self.dice_fp32_vs_truth, self.dice_int8_vs_truth
        if a is None or b is None:
            return None
        return {c: 100.0 * (a[c] - b[c]) for c in a}

    def validation(self) -> dict[str, Any]:
        """The verdict the INT8 bundle's manifest records: with ground truth, INT8 loses at most
        MAX_DICE_DROP_POINTS Dice points per class against FP32 on the held-out volumes; without,
        its labels reach Dice >= MIN_DICE_VS_FP32 per class against the FP32 labels."""
        drop = self.dice_drop_points
        if drop is not None:
            criterion = f"held-out Dice vs truth, FP32 - INT8 <= {MAX_DICE_DROP_POINTS} points per class"
            worst = max(drop.values())
            passed = worst <= MAX_DICE_DROP_POINTS
            summary = f"largest Dice drop {worst:+.2f} points against the limit {MAX_DICE_DROP_POINTS}"
        else:
            criterion = f"held-out Dice INT8 vs FP32 labels >= {MIN_DICE_VS_FP32} per class"
            lowest = min(self.dice_vs_fp32.values())
            passed = lowest >= MIN_DICE_VS_FP32
            summary = f"lowest Dice INT8 vs FP32 {lowest:.4f} against the limit {MIN_DICE_VS_FP32}"
        return {
            "verdict": PASSED if passed else FAILED,
            "by": f"ldseg calibration report ({REPORT_MD}), ONNX Runtime CPU, held-out "
            + ", ".join(self.holdout_volumes),
            "criterion": criterion,
            "summary": summary,
            "measured": self.to_dict()["summary"],
        }

    def to_dict(self) -> dict[str, Any]:
        def classes(d: dict[int, float] | None) -> dict[str, float] | None:
            return None if d is None else {str(c): round(v, 6) for c, v in d.items()}

        return {
            "bundle": str(self.bundle),
            "source_bundle": {"path": str(self.source_bundle), "manifest_sha256": self.source_hash},
            "method": self.method,
            "data": self.data,
            "calibration_volumes": self.calibration_volumes,
            "holdout_volumes": self.holdout_volumes,
            "samples": self.samples,
            "timesteps": self.timesteps,
            "summary": {
                "dice_int8_vs_fp32": classes(self.dice_vs_fp32),
                "label_agreement": round(self.label_agreement, 6),
                "dice_fp32_vs_truth": classes(self.dice_fp32_vs_truth),
                "dice_int8_vs_truth": classes(self.dice_int8_vs_truth),
                "dice_drop_points": classes(self.dice_drop_points),
            },
            "graphs": {
                name: {**g.to_dict(), "error": _error_dict(self.errors.get(name))} for name, g in self.graphs.items()
            },
            "volumes": [
                {
                    "name": v.name,
                    "dice_int8_vs_fp32": classes(v.dice_vs_fp32),
                    "label_agreement": v.agreement,
                    "dice_fp32_vs_truth": classes(v.dice_fp32_vs_truth),
                    "dice_int8_vs_truth": classes(v.dice_int8_vs_truth),
                }
                for v in self.volumes
            ],
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        def row(d: dict[int, float] | None, scale: float = 1.0, fmt: str = ".4f") -> str:
            return " | ".join("–" if d is None else format(d[c] * scale, fmt) for c in range(1, self.num_classes))

        classes = " | ".join(f"class {c}" for c in range(1, self.num_classes))
        sep = "|".join(["---"] * self.num_classes)
        lines = [
            f"# INT8 calibration of {self.source_bundle}",
            "",
            f"- INT8 bundle: `{self.bundle}` (Q/DQ, S8S8 symmetric, per-channel weights; source manifest SHA-256 "
            f"`{self.source_hash[:16]}…`)",
            f"- method: {self.method}; data: {self.data}",
            f"- calibrated on {len(self.calibration_volumes)} volume(s): {', '.join(self.calibration_volumes)}",
            f"- held out (never calibrated on): {', '.join(self.holdout_volumes)}",
            f"- denoise_step calibrated at all {len(self.timesteps)} sampler steps, t = "
            + ", ".join(f"{t:.0f}" for t in self.timesteps),
            "",
            "## Held-out volumes: INT8 pipeline vs FP32 pipeline (ONNX Runtime CPU)",
            "",
            f"| | {classes} |",
            f"|{sep}|",
            f"| Dice INT8 vs FP32 labels | {row(self.dice_vs_fp32)} |",
            f"| Dice FP32 vs truth | {row(self.dice_fp32_vs_truth)} |",
            f"| Dice INT8 vs truth | {row(self.dice_int8_vs_truth)} |",
            f"| Dice drop, points (FP32 − INT8) | {row(self.dice_drop_points, fmt='+.2f')} |",
            "",
            f"Label agreement INT8 vs FP32: {100 * self.label_agreement:.3f} % of voxels.",
            "",
            "## Per graph (inputs of the held-out FP32 trajectories)",
            "",
            "| graph | samples | max abs | max rel | mean abs | labels agree | quantized | left FP32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, g in self.graphs.items():
            e = self.errors.get(name)
            agree = "–" if e is None or e.label_agreement is None else f"{100 * e.label_agreement:.3f} %"
            quantized = ", ".join(f"{op} {n}" for op, n in g.quantized.items()) or "none"
            fp32 = ", ".join(f"{op} {n}" for op, n in g.fp32_ops.items())
            errs = "– | – | –" if e is None else f"{e.max_abs:.3g} | {e.max_rel:.3g} | {e.mean_abs:.3g}"
            lines.append(f"| {name} | {e.samples if e else 0} | {errs} | {agree} | {quantized} | {fp32} |")
        lines += ["", "## Compute nodes deliberately left in FP32", ""]
        for name, g in self.graphs.items():
            for k in g.kept_compute:
                lines.append(f"- {name}: `{k.node}` ({k.op}): {k.reason}")
            if g.preprocess_note:
                lines.append(f"- {name}: {g.preprocess_note}")
        lines += [
            "",
            "Every normalization (GroupNorm's ReduceMean/Sub/Pow/Sqrt/Reciprocal/Mul chain, BatchNorm), Softmax, "
            "the min-max, the sampler update and the argmax run in FP32 with no Q/DQ around them; the full node "
            f"lists are in {REPORT_JSON}.",
        ]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder = Path(folder)
        js, md = folder / REPORT_JSON, folder / REPORT_MD
        js.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md.write_text(self.to_markdown())
        return js, md


def _error_dict(e: GraphError | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "samples": e.samples,
        "max_abs": e.max_abs,
        "max_rel": e.max_rel,
        "mean_abs": e.mean_abs,
        "label_agreement": e.label_agreement,
    }


def graph_errors(
    fp32: Bundle, int8: Bundle, trajectories: Trajectories, *, threads: int | None = None
) -> dict[str, GraphError]:
    """Run each graph of both bundles on the same inputs and compare the outputs."""
    errors = {}
    for name in int8.graphs:
        feeds = trajectories.feeds.get(name, [])
        if not feeds or name not in fp32.graphs:
            continue
        ref_session, q_session = session(fp32.graph_path(name), threads), session(int8.graph_path(name), threads)
        max_abs = max_ref = total = 0.0
        count = agree = 0
        for feed in batches(feeds):
            (ref,) = ref_session.run(None, feed)
            (out,) = q_session.run(None, feed)
            if ref.dtype == np.uint8:
                agree += int((ref == out).sum())
                count += ref.size
                continue
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            max_abs = max(max_abs, float(diff.max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
            total += float(diff.sum())
            count += diff.size
        if name == "decoder_argmax":
            errors[name] = GraphError(name, len(feeds), 0.0, 0.0, 0.0, agree / max(count, 1))
        else:
            errors[name] = GraphError(name, len(feeds), max_abs, max_abs / max(max_ref, 1e-12), total / max(count, 1))
    return errors


def compare_pipelines(
    fp32: Bundle, int8: Bundle, volumes: Sequence[CalibrationVolume], *, threads: int | None = None
) -> list[VolumeResult]:
    """Both bundles through OnnxRuntimeBackend (CPU) on the same volumes, noise and table."""
    ref = OnnxRuntimeBackend(fp32, "cpu", threads=threads)
    quant = OnnxRuntimeBackend(int8, "cpu", threads=threads)
    k = fp32.config.num_classes
    results = []
    for i, volume in enumerate(volumes):
        z_init, noise = draw_noise([SAMPLING_SEED + i], fp32.steps, fp32.config.latent_shape)
        inputs = PipelineInputs(volume.image[None].astype(np.float32), z_init, noise, fp32.table_array())
        a = ref.run(inputs).labels[0]
        b = quant.run(inputs).labels[0]
        truth = volume.label
        results.append(
            VolumeResult(
                volume.name,
                dice_per_class(b, a, k),
                agreement(a, b),
                None if truth is None else dice_per_class(a, truth, k),
                None if truth is None else dice_per_class(b, truth, k),
            )
        )
    return results
