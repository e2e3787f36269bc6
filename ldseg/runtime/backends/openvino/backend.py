"""OpenVINO backend (CPU): a bundle's encoder, N fused sampler steps and label decoder.

Precisions: `fp32` and `bf16` run an FP32 bundle, bf16 through OpenVINO's INFERENCE_PRECISION_HINT
and only on a CPU with native BF16 (OpenVINO's OPTIMIZATION_CAPABILITIES lists "BF16": AVX512_BF16
or AMX); `int8` runs a Q/DQ bundle from `ldseg-export calibrate`, whose quantized convolutions
OpenVINO executes with its integer kernels. fp32 and int8 pin the hint to f32: OpenVINO would
otherwise choose bf16 by itself on some CPUs, and reduced precision is never silent here.

Buffers: per batch size, one set of numpy arrays (image, z_image, two ping-pong latents, coeffs,
noise, labels, probabilities when asked for) wrapped once as shared-memory ov.Tensors, and one
infer request per graph, made on first use and reused by every later run (`Backend.sample`
denoises at batch K but encodes at 1 and decodes in chunks: the batch-K plan never compiles an
encoder or decoder, whose requests would hold full-resolution activation memory for K samples).
Step i sets the request's latent tensors to z[p] -> z[1 - p] (pointer swaps, no copies). Each
graph is compiled with its batch axis pinned, so OpenVINO plans static memory.

The loop runs the fused `denoise_step` graph once per step. Its alternative, the raw denoiser in
OpenVINO with the sampler update in numpy, was no faster on knee3d (see README, OpenVINO section):
the loop is ~2 % of the work, so the fused graph, which keeps the update in the exported numerics,
stays.

Compiled models are cached through OpenVINO's CACHE_DIR under ldseg's artifact cache
(`$LDSEG_CACHE/openvino`, default platformdirs' user cache dir `ldseg/openvino`).
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.runtime.artifacts.bundle import Bundle, load_bundle
from ldseg.runtime.backend import Backend, PipelineInputs

PRECISIONS = ("fp32", "bf16", "int8")
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INFERENCE_PRECISION_HINT per precision


def import_openvino() -> Any:
    """The openvino module, or BackendUnavailable saying why not."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(
            "openvino is not installed (no wheel for this platform; where one exists: pip install 'ldseg[openvino]')"
        ) from exc
    return openvino


def cpu_capabilities(core: Any) -> set[str]:
    """What OpenVINO's CPU plugin reports it can run natively here ("FP32", "BF16", "INT8", ...)."""
    return {str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OpenVinoPlan:
    """Buffers, tensors and infer requests for one batch size (the plan of every step count)."""

    def __init__(self, backend: OpenVinoBackend, batch: int):
        ov, bundle = backend.ov, backend.bundle
        enc, step, argmax = (bundle.graph(n) for n in ("encoder", "denoise_step", "decoder_argmax"))
        self.backend, self.batch = backend, batch
        self.image = np.zeros(enc.inputs[0].concrete(batch), np.float32)
        self.z_image = np.zeros(enc.outputs[0].concrete(batch), np.float32)
        self.z = [np.zeros(step.inputs[0].concrete(batch), np.float32) for _ in range(2)]
        self.coeffs = np.zeros(step.inputs[2].concrete(batch), np.float32)
        self.noise = np.zeros(step.inputs[3].concrete(batch), np.float32)
        self.labels = np.zeros(argmax.outputs[0].concrete(batch), np.dtype(argmax.outputs[0].dtype))
        self.probs: np.ndarray | None = None
        self.tensors = {
            id(a): ov.Tensor(a, shared_memory=True)
            for a in (self.image, self.z_image, *self.z, self.coeffs, self.noise, self.labels)
        }
        self.decoder: Any = None
        self.inputs: PipelineInputs | None = None  # the run's table and noise, read by each step

    @cached_property
    def encoder(self) -> Any:
        return self._request("encoder", [self.image], [self.z_image])

    @cached_property
    def step(self) -> Any:
        return self._request("denoise_step", [self.z[0], self.z_image, self.coeffs, self.noise], [self.z[1]])

    @cached_property
    def argmax(self) -> Any:
        return self._request("decoder_argmax", [self.z[0]], [self.labels])

    def tensor(self, array: np.ndarray) -> Any:
        return self.tensors[id(array)]

    def _request(self, graph: str, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> Any:
        request = self.backend.compiled(graph, self.batch).create_infer_request()
        for i, array in enumerate(inputs):
            request.set_input_tensor(i, self.tensor(array))
        for i, array in enumerate(outputs):
            request.set_output_tensor(i, self.tensor(array))
        return request

    def probabilities_request(self) -> tuple[Any, np.ndarray]:
        if self.decoder is None or self.probs is None:  # made on the first run that asks
            info = self.backend.bundle.graph("decoder")
            self.probs = np.zeros(info.outputs[0].concrete(self.batch), np.float32)
            self.tensors[id(self.probs)] = self.backend.ov.Tensor(self.probs, shared_memory=True)
            self.decoder = self._request("decoder", [self.z[0]], [self.probs])
        return self.decoder, self.probs


class OpenVinoBackend(Backend[OpenVinoPlan, int]):
    """Latents are ping-pong buffer indices: step i reads z[p] and returns 1 - p."""

    name = "openvino"

    def __init__(
        self,
        bundle: Bundle | Path | str,
        precision: str | None = None,
        *,
        threads: int | None = None,
        cache: Path | None = None,
    ):
        """precision None: the bundle's own (fp32 or int8), never a reduced one the bundle does not
        hold. cache: OpenVINO's compiled-model cache folder (None: none; selection passes the artifact cache's)."""
        self.ov = import_openvino()
        loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        super().__init__(loaded.config, f"bundle {loaded.preset!r}")
        self.bundle = loaded
        self.device = "cpu"
        self.precision = _check_precision(loaded, precision)
        for name in ("encoder", "denoise_step", "decoder_argmax"):
            loaded.graph(name)  # refuse a bundle without the graphs a run needs, now
        self.core = self.ov.Core()
        if self.precision == "bf16":
            capabilities = cpu_capabilities(self.core)
            if "BF16" not in capabilities:
                raise BackendUnavailable(
                    "bf16 needs a CPU with native BF16 (AVX512_BF16 or AMX); OpenVINO reports only "
                    f"{', '.join(sorted(capabilities))} here: use --precision fp32 (or an int8 bundle)"
                )
        self.threads = threads or default_threads()
        self.cache = Path(cache) if cache else None
        if self.cache is not None:
            self.core.set_property({"CACHE_DIR": str(self.cache)})
        self.allocations = 0  # buffer sets allocated so far (one per batch size)
        self._compiled: dict[tuple[str, int], Any] = {}
        self._compiling = threading.Lock()  # prepare()'s thread and a run compile one graph at a time
        self._prepared: threading.Thread | None = None
        self._plans: dict[int, OpenVinoPlan] = {}

    def prepare(self, batch: int) -> None:
        """Compile (or load from the compiled-model cache) the graphs of a run at `batch` on a thread of
        its own: about a second of a cold run's start, spent while the first input is being read."""
        graphs = [g for g in ("encoder", "denoise_step", "decoder", "decoder_argmax") if g in self.bundle.graphs]

        def compile_all() -> None:
            for graph in graphs:
                try:
                    self.compiled(graph, batch)
                except ArtifactError:
                    return  # the run's own compile says it again, in its one line

        self._prepared = threading.Thread(target=compile_all, name="ldseg-openvino-compile", daemon=True)
        self._prepared.start()

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "inference_precision_hint": _HINTS[self.precision],
            "threads": str(self.threads),
            "cache": str(self.cache) if self.cache else "off",
            "openvino": str(self.ov.__version__),
            "bundle": str(self.bundle.path),
            "preset": self.bundle.preset,
        }

    def compiled(self, name: str, batch: int) -> Any:
        """One graph compiled for CPU with its batch axis pinned (cached per (graph, batch))."""
        key = (name, batch)
        with self._compiling:
            return self._compiled[key] if key in self._compiled else self._compile(name, batch)

    def _compile(self, name: str, batch: int) -> Any:
        key = (name, batch)
        if key not in self._compiled:
            info = self.bundle.graph(name)
            path = self.bundle.path / info.file
            try:
                model = self.core.read_model(str(path))
                if self.precision == "int8" and name in ("denoise_step", "denoiser"):
                    _keep_concats_float(self.ov, model)
                model.reshape({t.name: list(t.concrete(batch)) for t in info.inputs})
                self._compiled[key] = self.core.compile_model(
                    model,
                    "CPU",
                    {
                        "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
                        "INFERENCE_NUM_THREADS": self.threads,
                        "PERFORMANCE_HINT": "LATENCY",
                        "NUM_STREAMS": 1,
                    },
                )
            except RuntimeError as exc:
                raise ArtifactError(f"{path}: OpenVINO cannot compile it ({str(exc).splitlines()[0]})") from exc
        return self._compiled[key]

    # ------------------------------------------------------------------ stages
    def plan(self, batch: int, steps: int) -> OpenVinoPlan:
        if batch not in self._plans:
            self._plans[batch] = OpenVinoPlan(self, batch)
            self.allocations += 1
        return self._plans[batch]

    def copy_image(self, plan: OpenVinoPlan, image: np.ndarray) -> None:
        np.copyto(plan.image, image)

    def copy_latents(self, plan: OpenVinoPlan, inputs: PipelineInputs) -> int:
        np.copyto(plan.z[0], inputs.z_init)
        plan.inputs = inputs
        return 0

    def broadcast(self, src: OpenVinoPlan, dst: OpenVinoPlan) -> None:
        if src is not dst:
            np.copyto(dst.z_image, src.z_image)  # (1, *latent) -> (K, *latent)

    def take(self, src: OpenVinoPlan, z: int, start: int, dst: OpenVinoPlan) -> int:
        np.copyto(dst.z[0], src.z[z][start : start + dst.batch])
        return 0

    def encode(self, plan: OpenVinoPlan) -> None:
        plan.encoder.infer()

    def step(self, plan: OpenVinoPlan, z: int, i: int) -> int:
        assert plan.inputs is not None
        np.copyto(plan.coeffs, plan.inputs.table[i])  # one row, broadcast to (B, 4)
        np.copyto(plan.noise, plan.inputs.noise[i])
        plan.step.set_input_tensor(0, plan.tensor(plan.z[z]))
        plan.step.set_output_tensor(0, plan.tensor(plan.z[1 - z]))
        plan.step.infer()
        return 1 - z

    def decode(self, plan: OpenVinoPlan, z: int, probabilities: bool) -> None:
        request = plan.probabilities_request()[0] if probabilities else plan.argmax
        request.set_input_tensor(0, plan.tensor(plan.z[z]))
        request.infer()

    def copy_out(self, plan: OpenVinoPlan, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if probabilities:  # labels on the host (first maximum, like torch): the decoder never runs twice
            probs = plan.probabilities_request()[1].copy()
            return probs.argmax(axis=1).astype(np.uint8), probs
        return plan.labels.copy(), None

    def release(self) -> None:
        if self._prepared is not None:
            self._prepared.join()  # a compile in flight finishes before its models are dropped
        self._plans.clear()
        self._compiled.clear()


def _keep_concats_float(ov: Any, model: Any) -> None:
    """Make every float Concat an extra model output, which keeps OpenVINO's low-precision pass from
    merging the Concat's differently-scaled quantized inputs onto one requantized scale. On the demo
    INT8 bundle that merge took the denoiser's error against ONNX Runtime's INT8 from 1.7e-7 to 0.30
    (relative L2) and the labels' agreement with FP32 from ~99.8 % to ~98.5 %. Applied to the
    denoiser graphs only: there the Concats sit on latent-sized tensors (skips, time embedding), so
    the extra outputs cost nothing; the decoder's INT8 output already matched ONNX Runtime's."""
    concats = [
        op.output(0)
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Concat" and op.get_output_element_type(0) == ov.Type.f32
    ]
    if concats:
        model.add_outputs(concats)


def _check_precision(bundle: Bundle, precision: str | None) -> str:
    """The precision this bundle runs at when `precision` is asked for, or BackendUnavailable."""
    if bundle.precision not in ("fp32", "int8"):
        raise BackendUnavailable(
            f"{bundle.path}: the bundle is {bundle.precision}; the openvino backend runs fp32 bundles (fp32, bf16) "
            "and int8 bundles from `ldseg-export calibrate`"
        )
    if precision is None or precision == "auto":
        return bundle.precision
    if precision not in PRECISIONS:
        raise BackendUnavailable(f"precision {precision}: the openvino backend runs {', '.join(PRECISIONS)}")
    if (precision == "int8") != (bundle.precision == "int8"):
        need = "an int8 bundle (ldseg-export calibrate)" if precision == "int8" else "an fp32 bundle"
        raise BackendUnavailable(f"{bundle.path}: the bundle is {bundle.precision}; {precision} needs {need}")
    return precision
