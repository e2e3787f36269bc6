"""Check an exported bundle against the PyTorch model it came from, with stated tolerances.

Per graph: fresh random inputs through ONNX Runtime (CPU) and PyTorch; reported as max abs error,
relative error (max abs error / max |reference|) and, for label maps, the % of identical voxels.
Whole pipeline: one synthetic phantom, same seed, encoder -> N fused steps -> decoder in both,
compared by % identical labels. Like Polygraphy's comparator it reports the numbers, not only
pass/fail, so a failing export can be debugged.

Proportionate: the graphs are traced at batch 2, so checking at a batch other than that exercises
the dynamic batch, and batch 2 exercises per-sample independence. Latent-sized graphs are checked at
`batch` (2); a graph with a full-resolution input or output is checked at batch 1 once the model
grid exceeds FULL_BATCH_VOXELS (knee3d: 4.2M voxels, where one CPU pass of the decoder costs tens
of seconds), the small presets keep batch 2. decoder_argmax is the decoder plus an ArgMax
(ldseg.export.compose), so it is compared with the argmax of the decoder's PyTorch reference on the
same inputs instead of running the PyTorch decoder again.

Beyond FULL_BATCH_VOXELS the full-resolution graphs are checked on the pipeline's own inputs
instead of random ones: the PyTorch pipeline on the phantom runs once, stage by stage, and its stages
are the references for the encoder (the phantom image), the decoder and decoder_argmax (the final
latent) and the pipeline row (its labels). The rows and tolerances are the same; the inputs are a
real image and a real latent, PyTorch runs the encoder and decoder once instead of twice, and ONNX
Runtime's pipeline run is staged so its encoder run is also the encoder row. The decoder rows run in
sessions configured as the ONNX Runtime backend configures them (batch pinned, no memory pattern:
a knee3d decoder run about 30 % faster), and once: decoder_argmax is checked to be, byte for byte,
what the export derives from decoder.onnx, so one run of it with the decoder's output exposed is a
run of both graphs (otherwise each runs on its own). What remains is the compute of full-resolution
passes: PyTorch's encoder and decoder (about 20 s on 2 Zen 1 cores) and ONNX Runtime's encoder and
two decoder runs (on PyTorch's final latent for the rows, on its own for the pipeline's; about
19 s); benchmarks/export_speed.py measures it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("bundle validation"):
    import onnxruntime as ort
import torch
from rich.markup import escape
from rich.table import Table

from ldseg.data.phantoms import make_phantom
from ldseg.export.onnx_export import derive_graph
from ldseg.export.specs import GraphSpec, graph_specs
from ldseg.model.checkpoint import load_checkpoint
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import FAILED, PASSED, Bundle, load_bundle
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.torch.backend import TorchBackend


@dataclass(frozen=True)
class Tolerance:
    rel: float  # float outputs: max abs error <= rel * max |reference| ...
    atol: float  # ... + atol
    agreement: float  # label maps: minimum % identical voxels


# FP32 differs from PyTorch only by summation order: measured 2e-6 (demo) to 1.6e-5 (knee3d
# decoder) of max |ref|; the knee3d encoder 2.5e-6 since GroupNorm reduces in two levels
# (layers.GroupNorm; one 4.2M-voxel ReduceMean in ONNX Runtime had put it at 2.3e-3). FP16
# adds FP16 rounding of weights and activations (normalizations, softmax and the sampler update
# stay FP32, see fp16.py): measured 1e-4 to 1.2e-3 of max |ref|.
FULL_BATCH_VOXELS = 1 << 20
FULL_RESOLUTION = frozenset({"encoder", "decoder", "decoder_argmax"})

TOLERANCES = {
    "fp32": Tolerance(rel=5e-4, atol=1e-5, agreement=99.9),
    "fp16": Tolerance(rel=2e-2, atol=1e-3, agreement=99.5),
}


@dataclass(frozen=True)
class GraphCheck:
    graph: str  # graph name, or "pipeline"
    output: str
    max_abs: float | None
    rel: float | None  # max_abs / max |reference|
    agreement: float | None  # % identical labels
    limit: str  # the tolerance, in words
    passed: bool


@dataclass(frozen=True)
class ValidationReport:
    bundle: Path
    precision: str
    checks: tuple[GraphCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def pipeline_agreement(self) -> float | None:
        return next((c.agreement for c in self.checks if c.graph == "pipeline"), None)

    def record(self) -> dict[str, Any]:
        """What the manifest records (ldseg.export.manifest.with_validation): verdict, tolerance, rows."""
        failing = [f"{c.graph} {c.output}" for c in self.checks if not c.passed]
        return {
            "verdict": PASSED if self.passed else FAILED,
            "by": "ldseg.export.validate: ONNX Runtime (CPU) vs PyTorch FP32 (CPU)",
            "tolerance": dataclasses.asdict(TOLERANCES[self.precision]),
            "summary": f"fails {', '.join(failing)}" if failing else f"all {len(self.checks)} checks within tolerance",
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }

    def table(self) -> Table:
        table = Table(title=escape(f"ONNX Runtime (CPU) vs PyTorch — {self.bundle.name} ({self.precision})"))
        for column in ("graph", "output", "max abs err", "rel err", "identical labels", "tolerance", "result"):
            table.add_column(column, justify="left" if column in ("graph", "output", "tolerance") else "right")
        for c in self.checks:
            table.add_row(
                c.graph,
                escape(c.output),
                "" if c.max_abs is None else f"{c.max_abs:.3g}",
                "" if c.rel is None else f"{c.rel:.3g}",
                "" if c.agreement is None else f"{c.agreement:.3f} %",
                escape(c.limit),
                "[green]pass[/green]" if c.passed else "[bold red]FAIL[/bold red]",
            )
        return table

    def __rich__(self) -> Table:
        return self.table()


def compare_arrays(graph: str, output: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> GraphCheck:
    if ref.dtype == np.uint8:
        agreement = float((got == ref).mean() * 100.0)
        return GraphCheck(
            graph, output, None, None, agreement, f">= {tol.agreement} % identical", agreement >= tol.agreement
        )
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    scale = float(np.abs(ref).max())
    rel = err / scale if scale > 0 else err
    passed = bool(np.isfinite(err)) and err <= tol.rel * scale + tol.atol
    return GraphCheck(graph, output, err, rel, None, f"abs <= {tol.rel:g}·max|ref| + {tol.atol:g}", passed)


def _session(bundle: Bundle, name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(bundle.graph_path(name)), options, providers=["CPUExecutionProvider"])


def check_batch(model: LDSeg, name: str, batch: int) -> int:
    """The batch graph `name` is checked at (see the module docstring)."""
    large = math.prod(model.cfg.image_size) > FULL_BATCH_VOXELS
    return 1 if large and name in FULL_RESOLUTION else batch


@torch.no_grad()
def _check_graph(
    bundle: Bundle,
    model: LDSeg,
    name: str,
    tol: Tolerance,
    seed: int,
    batch: int,
    references: dict[tuple[str, int], np.ndarray] | None = None,
) -> GraphCheck:
    """One graph on random inputs; `references` keeps PyTorch outputs that a derived graph reuses."""
    spec = graph_specs(model.cfg)[name]
    gen = torch.Generator().manual_seed(seed)
    args = spec.example_inputs(model.cfg, batch, gen)
    cache = references if references is not None else {}
    if name == "decoder_argmax" and ("decoder", batch) in cache:  # same inputs: same seed, same maker
        ref = cache[("decoder", batch)].argmax(axis=1).astype(np.uint8)
    else:
        ref = spec.build(model).eval()(*args).numpy()
        cache[(name, batch)] = ref
    got = _session(bundle, name).run(None, {n: a.numpy() for n, a in zip(spec.input_names, args)})[0]
    return compare_arrays(name, spec.outputs[0].name, got, ref, tol)


def phantom_image(model: LDSeg, seed: int) -> np.ndarray:
    """One synthetic phantom on the model grid, (1, C, *grid); grey replicated over channels (RGB)."""
    cfg = model.cfg
    phantom = make_phantom(seed, cfg.image_size, min(cfg.num_classes, 3))
    return np.repeat(phantom.image[None, None], cfg.image_channels, axis=1).astype(np.float32)


def _check_pipeline(bundle: Bundle, model: LDSeg, tol: Tolerance, seed: int) -> GraphCheck:
    inputs = make_inputs(model.cfg, phantom_image(model, seed), [seed], bundle.steps, bundle.sampler)
    ours = OnnxRuntimeBackend(bundle).run(inputs).labels
    ref = TorchBackend(model).run(inputs).labels
    return compare_arrays("pipeline", f"labels (phantom, {bundle.steps} steps)", ours, ref, tol)


def validate_bundle(
    bundle_dir: Path | str,
    model: LDSeg | Path | str,
    *,
    seed: int = 0,
    graphs: Sequence[str] | None = None,
    pipeline: bool = True,
    batch: int = 2,
) -> ValidationReport:
    """Compare every graph of the bundle (or `graphs`) on random inputs of `batch` samples and, if
    `pipeline`, the whole pipeline on one phantom, ONNX Runtime CPU vs PyTorch CPU. `model` is the
    LDSeg (or its checkpoint) that was exported; it is moved to the CPU and set to eval mode."""
    bundle = load_bundle(bundle_dir, trust_unvalidated=True)  # judging it is the point
    if not isinstance(model, LDSeg):
        model = load_checkpoint(model)
    model.cpu().eval()
    bundle.check_compatible(model.cfg)
    if bundle.precision not in TOLERANCES:
        raise ValueError(
            f"{bundle.path}: no export tolerances for a {bundle.precision} bundle (see its calibration report)"
        )
    tol = TOLERANCES[bundle.precision]
    names = [g for g in bundle.graphs if graphs is None or g in graphs]
    names.sort(key=lambda g: g == "decoder_argmax")  # after the decoder, whose reference it reuses
    together: dict[str, GraphCheck] = {}
    if pipeline and math.prod(model.cfg.image_size) > FULL_BATCH_VOXELS and FULL_RESOLUTION <= set(names):
        together = _check_along_the_pipeline(bundle, model, tol, seed)
    references: dict[tuple[str, int], np.ndarray] = {}
    checks = [
        together.get(name) or _check_graph(bundle, model, name, tol, seed, check_batch(model, name, batch), references)
        for name in names
    ]
    if pipeline:
        checks.append(together.get("pipeline") or _check_pipeline(bundle, model, tol, seed))
    return ValidationReport(bundle.path, bundle.precision, tuple(checks))


@torch.no_grad()
def _check_along_the_pipeline(bundle: Bundle, model: LDSeg, tol: Tolerance, seed: int) -> dict[str, GraphCheck]:
    """The full-resolution graphs and the pipeline against one PyTorch pipeline run on the phantom
    (module docstring): {graph or "pipeline": its check}. Both pipelines run stage by stage; the
    ONNX Runtime pipeline's own encoder run is the encoder row."""
    inputs = make_inputs(model.cfg, phantom_image(model, seed), [seed], bundle.steps, bundle.sampler)
    reference = TorchBackend(model)
    plan = reference.plan(1, inputs.steps)
    z = reference.copy_in(plan, inputs)
    reference.encode(plan)
    assert plan.z_image is not None
    z_image = plan.z_image.numpy()
    z = reference.loop(plan, z, inputs.steps)
    reference.decode(plan, z, True)
    assert plan.probabilities is not None and plan.labels is not None
    latent, probabilities, labels = z.numpy(), plan.probabilities.numpy(), plan.labels.numpy()
    specs = graph_specs(model.cfg)

    ours = OnnxRuntimeBackend(bundle)
    ours_plan = ours.plan(1, inputs.steps)
    ours_z = ours.copy_in(ours_plan, inputs)
    ours.encode(ours_plan)
    ours_z_image = ours_plan.pipe.z_image.read()
    ours.decode(ours_plan, ours.loop(ours_plan, ours_z, inputs.steps), False)
    ours_labels, _ = ours.copy_out(ours_plan, False)
    return {
        "encoder": compare_arrays("encoder", specs["encoder"].outputs[0].name, ours_z_image, z_image, tol),
        **_decoder_rows(bundle, ours, specs, (latent, probabilities, labels), tol),
        "pipeline": compare_arrays("pipeline", f"labels (phantom, {bundle.steps} steps)", ours_labels, labels, tol),
    }


def _decoder_rows(
    bundle: Bundle,
    ours: OnnxRuntimeBackend,
    specs: dict[str, GraphSpec],
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    tol: Tolerance,
) -> dict[str, GraphCheck]:
    """The decoder and decoder_argmax rows on PyTorch's final latent, in sessions configured as the
    ONNX Runtime backend configures them. When decoder_argmax.onnx is, byte for byte, what the export
    derives from decoder.onnx (ldseg.export.compose), one run of it with the decoder's output exposed
    gives both rows: its probabilities are decoder.onnx's nodes on decoder.onnx's initializers.
    Otherwise each graph runs on its own. `reference`: PyTorch's latent, probabilities and labels."""
    latent, probabilities, labels = reference
    decoder = onnx.load(str(bundle.graph_path("decoder")))
    derived = onnx.load(str(bundle.graph_path("decoder_argmax")))
    (input_name,) = specs["decoder"].input_names
    (prob_name,), (label_name,) = specs["decoder"].output_names, specs["decoder_argmax"].output_names

    def run(proto: onnx.ModelProto, name: str) -> list[np.ndarray]:
        options = ours.session_options(name, batch=1)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, {input_name: latent})

    if derive_graph(specs["decoder_argmax"], decoder).SerializeToString() == derived.SerializeToString():
        derived.graph.output.extend(decoder.graph.output)
        got_labels, got_probabilities = run(derived, "decoder_argmax")
    else:
        (got_probabilities,), (got_labels,) = run(decoder, "decoder"), run(derived, "decoder_argmax")
    return {
        "decoder": compare_arrays("decoder", prob_name, got_probabilities, probabilities, tol),
        "decoder_argmax": compare_arrays("decoder_argmax", label_name, got_labels, labels, tol),
    }
