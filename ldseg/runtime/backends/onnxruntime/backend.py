"""ONNX Runtime backend: a bundle's encoder, N fused sampler steps and label decoder, via IOBinding.

Buffers: per batch size, one set of OrtValues is allocated on first use and reused by every later
run: image, z_image, two latent buffers the steps ping-pong between (step i reads one and writes
the other) and the outputs. Per (batch, steps), the run's whole coefficient table (steps, B, 4) and
noise (steps, B, *latent) live in two more OrtValues, written once per run (on CUDA: two uploads,
no per-step host sync), and the step graph has one IOBinding per step index whose coeffs and noise
inputs are bound by raw pointer to that step's rows (`bind_input(name, device, id, dtype, shape,
ptr)`). CPU and CUDA share this structure, so the CPU tests cover it.

Sessions are created per batch with the "batch" axis pinned (add_free_dimension_override_by_name):
ORT then folds the dynamic graph's shape arithmetic into constants, which a CUDA graph needs.

Sessions are made on first use: `Backend.sample` encodes at batch 1, denoises at batch K and
decodes in chunks, so the batch-K plan never creates (or compiles) an encoder or decoder session.

Labels come from decoder_argmax. When probabilities are asked for, the decoder graph runs instead
and labels are its argmax on the host (first maximum, like torch and ONNX ArgMax), so the decoder
never runs twice.

CUDA (device "cuda"/"cuda:N", needs onnxruntime-gpu, ldseg/runtime/backends/onnxruntime/probe.py): the CUDA EP with
TF32 off (fp32 means FP32) and enable_cuda_graph; every binding has its own gpu_graph_id, so ORT
captures one graph per binding, on the binding's third run. Sessions are created, checked (their
first provider must be CUDA: ORT silently falls back to CPU when the CUDA libraries do not load) and
run on zeros up to that capturing run when the backend is built, so a route that cannot work is
refused up front with the reason (auto-selection then moves on). A session that refuses graph
capture (nodes not on the CUDA EP, control flow) is recreated without it, and describe() says so.
Capture and the inputs: ORT captures one session run (one binding) at a time, and no binding
writes a buffer it reads (a step reads z[p] and writes z[1 - p]; table/noise rows and the image are
only read), so the capturing run, which ORT replays once after recording, computes what an eager
run does; the Backend-level capture is not used (cuda_graph stays False).
cuDNN's convolution algorithm search: ORT's default (EXHAUSTIVE) benchmarks every algorithm on a
session's first run; on an H200 that made the knee decoder's first run 446 ms against ~60 ms warm
(../shared/docs/measured-2026-12-04.md). LDSEG_ORT_CUDNN_ALGO_SEARCH (EXHAUSTIVE, HEURISTIC or
DEFAULT) sets it; the default stays EXHAUSTIVE until benchmarks/ort_cudnn_search.py has measured the
warm cost of HEURISTIC on a GPU (it has not: no GPU since), and describe() says which ran.
This path has NOT been run: the project's machines have had no GPU with onnxruntime-gpu.
"""

from __future__ import annotations

import os
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("the onnxruntime backend"):
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.runtime.artifacts.bundle import Bundle, GraphInfo, load_bundle
from ldseg.runtime.backend import Backend, PipelineInputs, make_inputs
from ldseg.runtime.backends.onnxruntime.probe import CUDA_PROVIDER, RUNS_TO_CAPTURE, cuda_problem
from ldseg.runtime.backends.onnxruntime.samples import OrtSampleGraphs, OrtSamples
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
from ldseg.runtime.devices import device_index

CUDNN_SEARCH_ENV = "LDSEG_ORT_CUDNN_ALGO_SEARCH"
CUDNN_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")  # the CUDA EP's cudnn_conv_algo_search values
_ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidProtobuf, ort_state.NoSuchFile)
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


class _Tensor:
    """One pre-allocated OrtValue. On CPU it wraps `host` (shared memory, no copies by ORT)."""

    def __init__(self, shape: tuple[int, ...], dtype: str, gpu: int | None):
        self.gpu = gpu  # CUDA device index, None on CPU
        self.host = np.zeros(shape, dtype=_DTYPES[dtype])
        if gpu is None:
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:  # device memory, refreshed with update_inplace (one upload per write)
            self.value = _cuda_value(shape, self.host.dtype, gpu)

    def write(self, array: np.ndarray) -> None:
        np.copyto(self.host, array)  # broadcasts, e.g. the table (steps, 4) to (steps, B, 4)
        if self.gpu is not None:
            self.value.update_inplace(self.host)

    def read(self) -> np.ndarray:
        return self.host.copy() if self.gpu is None else self.value.numpy()

    def row(self, i: int) -> _Row:
        return _Row(self, i)


def _cuda_value(shape: tuple[int, ...], dtype: np.dtype, gpu: int) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", gpu)


class _Row:
    """Row i of a (steps, ...) tensor, bound by raw pointer: a step reads its own rows in place."""

    def __init__(self, tensor: _Tensor, i: int):
        self.tensor, self.shape = tensor, tensor.host.shape[1:]
        self.ptr = tensor.value.data_ptr() + i * tensor.host[0].nbytes


class _Graph:
    """A session with its input/output OrtValues bound; several bindings (one CUDA graph each)."""

    def __init__(self, session: ort.InferenceSession, info: GraphInfo, gpu: int | None, graphs: bool):
        self.session, self.info, self.gpu, self.graphs = session, info, gpu, graphs
        self.bindings: list[ort.IOBinding] = []
        self.run_options: list[ort.RunOptions | None] = []

    def bind(self, inputs: list[_Tensor | _Row], outputs: list[_Tensor]) -> int:
        binding = self.session.io_binding()
        device, device_id = ("cpu", 0) if self.gpu is None else ("cuda", self.gpu)
        for spec, tensor in zip(self.info.inputs, inputs):
            if isinstance(tensor, _Row):
                dtype = tensor.tensor.host.dtype.type
                binding.bind_input(spec.name, device, device_id, dtype, list(tensor.shape), tensor.ptr)
            else:
                binding.bind_ortvalue_input(spec.name, tensor.value)
        for spec, tensor in zip(self.info.outputs, outputs):
            binding.bind_ortvalue_output(spec.name, tensor.value)
        options: ort.RunOptions | None = None
        if self.graphs:  # one captured CUDA graph per binding (its addresses are fixed)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(len(self.bindings) + 1))
        self.bindings.append(binding)
        self.run_options.append(options)
        return len(self.bindings) - 1

    def run(self, index: int = 0) -> None:
        self.session.run_with_iobinding(self.bindings[index], self.run_options[index])


_shared_cpu_arena = False


def _register_shared_cpu_arena() -> None:
    """One CPU memory arena for every session of this process instead of one each: the encoder's
    and the decoder's peaks stop adding up. knee3d, 15 steps: peak RSS 9.0 -> 5.0 GB at the same
    steady-state speed (an arena-free run takes 2.5 GB but runs ~15 % slower)."""
    global _shared_cpu_arena
    if not _shared_cpu_arena:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_cpu_arena = True


class BoundPipeline:
    """Sessions, buffers and bindings for one batch size (shared by the plans of every step count)."""

    def __init__(self, backend: OnnxRuntimeBackend, batch: int):
        bundle, gpu = backend.bundle, backend.gpu
        enc, step = bundle.graph("encoder"), bundle.graph("denoise_step")
        argmax = bundle.graph("decoder_argmax")
        self.backend, self.batch = backend, batch
        self.image = _Tensor(enc.inputs[0].concrete(batch), "float32", gpu)
        self.z_image = _Tensor(enc.outputs[0].concrete(batch), "float32", gpu)
        self.z = [_Tensor(step.inputs[0].concrete(batch), "float32", gpu) for _ in range(2)]
        self.coeffs_shape = step.inputs[2].concrete(batch)
        self.noise_shape = step.inputs[3].concrete(batch)
        self.labels = _Tensor(argmax.outputs[0].concrete(batch), argmax.outputs[0].dtype, gpu)
        self.probs: _Tensor | None = None
        self.decoder: _Graph | None = None

    @cached_property
    def encoder(self) -> _Graph:
        graph = self.backend.graph("encoder", self.batch)
        graph.bind([self.image], [self.z_image])
        return graph

    @cached_property
    def step(self) -> _Graph:
        return self.backend.graph("denoise_step", self.batch)  # bound per step index by each plan

    @cached_property
    def argmax(self) -> _Graph:
        graph = self.backend.graph("decoder_argmax", self.batch)
        for p in (0, 1):
            graph.bind([self.z[p]], [self.labels])
        return graph

    def probabilities_graph(self) -> tuple[_Graph, _Tensor]:
        if self.decoder is None or self.probs is None:  # built on the first run that asks
            info = self.backend.bundle.graph("decoder")
            self.probs = _Tensor(info.outputs[0].concrete(self.batch), "float32", self.backend.gpu)
            self.decoder = self.backend.graph("decoder", self.batch)
            for p in (0, 1):
                self.decoder.bind([self.z[p]], [self.probs])
        return self.decoder, self.probs

    def sessions(self) -> dict[str, _Graph]:
        return {"encoder": self.encoder, "denoise_step": self.step, "decoder_argmax": self.argmax}


class OrtPlan:
    """One (batch, steps): the run's table and noise, and one step binding per (index, parity)."""

    def __init__(self, pipe: BoundPipeline, steps: int):
        self.pipe, self.steps = pipe, steps
        gpu = pipe.backend.gpu
        self.table = _Tensor((steps, *pipe.coeffs_shape), "float32", gpu)
        self.noise = _Tensor((steps, *pipe.noise_shape), "float32", gpu)
        self.bindings: dict[tuple[int, int], int] = {}
        for i in range(steps):  # the loop starts in z[0]: step i reads z[i % 2]
            self.binding(i, i % 2)

    def binding(self, i: int, p: int) -> int:
        """The step binding reading z[p] and table/noise row i, writing z[1 - p] (made once)."""
        if (i, p) not in self.bindings:
            pipe = self.pipe
            inputs: list[_Tensor | _Row] = [pipe.z[p], pipe.z_image, self.table.row(i), self.noise.row(i)]
            self.bindings[i, p] = pipe.step.bind(inputs, [pipe.z[1 - p]])
        return self.bindings[i, p]


_GRAPH_REFUSAL = "graph capture feature"  # ORT's words when a session cannot be captured
_LATENT_GRAPHS = ("denoise_step", "denoiser")  # latent-sized tensors only: they keep their memory pattern


class OnnxRuntimeBackend(Backend[OrtPlan, int]):
    """Latents are ping-pong buffer indices: step i reads z[p] and returns 1 - p."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle | Path | str,
        device: str = "cpu",
        *,
        threads: int | None = None,
        cuda_graph: bool = True,
        device_volume: bool | None = None,
        graph_cache: Path | None = None,
    ):
        """cuda_graph (CUDA only): ORT's per-binding CUDA graphs; False runs every session eagerly
        (gpu_check compares the two). device_volume: pre/post-processing as ONNX graphs on this
        backend's provider (volume.py); None: on CUDA only (on the CPU scipy's path is the reference).
        graph_cache: the artifact cache root those small graphs are kept in (None: the user's)."""
        loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        super().__init__(loaded.config, f"bundle {loaded.preset!r}")
        self.bundle = loaded
        if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.gpu = device_index(device)
        if self.gpu is not None:
            problem = cuda_problem(list(ort.get_available_providers()))
            if problem:
                raise BackendUnavailable(f"onnxruntime on {device}: {problem}")
            cudnn_search()  # a bad LDSEG_ORT_CUDNN_ALGO_SEARCH is refused before any session is made
        for name in ("encoder", "denoise_step", "decoder_argmax"):
            self.bundle.graph(name)  # refuse a bundle without the graphs a run needs, now
        self.device = "cpu" if self.gpu is None else f"cuda:{self.gpu}"
        self.precision = self.bundle.precision
        self.threads = threads
        self.ort_graphs = cuda_graph
        self.allocations = 0  # buffer sets allocated so far (one per batch size)
        self.graph_refusals: dict[str, str] = {}  # graph -> why it runs without a CUDA graph
        on_device = self.gpu is not None if device_volume is None else device_volume
        self.graph_cache = graph_cache
        self._volume_ops = OrtVolumeOps(self._providers(graphs=False), self.device, graph_cache) if on_device else None
        self._pipelines: dict[int, BoundPipeline] = {}
        self._plans: dict[tuple[int, int], OrtPlan] = {}
        if self.gpu is not None:
            self._probe()

    def _probe(self) -> None:
        """Build batch 1's sessions, check they run on CUDA, and run once: a refusal happens now."""
        plan = self.plan(1, self.bundle.steps)
        for graph_name, graph in plan.pipe.sessions().items():
            providers = graph.session.get_providers()
            if providers[0] != CUDA_PROVIDER:
                raise BackendUnavailable(
                    f"onnxruntime: the {graph_name} session runs on {providers[0]}, not CUDA (the CUDA provider "
                    "could not load: its CUDA/cuDNN libraries are missing or do not match this onnxruntime-gpu)"
                )
        zeros = np.zeros((1, *self.config.image_shape), np.float32)
        try:  # up to the run that captures (so a capture failure surfaces here too)
            for _ in range(RUNS_TO_CAPTURE):
                self.run(make_inputs(self.config, zeros, [0], self.bundle.steps))
        except (*_ORT_ERRORS, ort_state.RuntimeException, ort_state.EPFail) as exc:  # CUDA errors, capture failures
            first = str(exc).splitlines()[0]
            raise BackendUnavailable(f"onnxruntime on {self.device} failed its first run: {first}") from exc

    def describe(self) -> dict[str, str]:
        if self.gpu is None:
            graph = "off (CPU)"
        elif not self.ort_graphs:
            graph = "off (asked)"
        elif self.graph_refusals:
            graph = "off for " + "; ".join(f"{g} ({why})" for g, why in self.graph_refusals.items())
        else:
            graph = "on (one CUDA graph per binding)"
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "providers": ", ".join(p for p, _ in self._providers(graphs=False)),
            "cuda_graph": graph,
            "tf32": "off" if self.gpu is not None else "n/a",
            "cudnn_conv_algo_search": cudnn_search() if self.gpu is not None else "n/a",
            "volume_ops": self.volume_ops_words(None if self._volume_ops is None else f"ONNX graphs on {self.device}"),
            "bundle": str(self.bundle.path),
            "preset": self.bundle.preset,
        }

    def device_volume_ops(self) -> OrtVolumeOps | None:
        return self._volume_ops

    @cached_property
    def _sample_graphs(self) -> OrtSampleGraphs:
        assert self._volume_ops is not None
        return OrtSampleGraphs(self._providers(graphs=False), self._volume_ops.device, self.graph_cache)

    def device_samples(self, samples: int) -> OrtSamples | None:
        """K samples kept where the volume ops read them (samples.py); None without them."""
        if self.volume_ops() is None:
            return None
        return OrtSamples(self._sample_graphs, samples, self.config.image_size, self.config.num_classes)

    def _providers(self, graphs: bool) -> list[tuple[str, dict[str, str]]]:
        if self.gpu is None:
            return [("CPUExecutionProvider", {})]
        options = {
            "device_id": str(self.gpu),
            "use_tf32": "0",
            "enable_cuda_graph": "1" if graphs else "0",
            "cudnn_conv_algo_search": cudnn_search(),
        }
        return [(CUDA_PROVIDER, options), ("CPUExecutionProvider", {})]

    def graph(self, name: str, batch: int) -> _Graph:
        """A session for one graph with the batch axis pinned to `batch` (CUDA: with graphs if it can)."""
        info = self.bundle.graph(name)
        options = self.session_options(name, batch)
        path = self.bundle.path / info.file
        graphs = self.gpu is not None and self.ort_graphs and name not in self.graph_refusals
        try:
            try:
                session = ort.InferenceSession(str(path), options, providers=self._providers(graphs))
            except _ORT_ERRORS as exc:
                if not graphs or _GRAPH_REFUSAL not in str(exc):
                    raise
                # Nodes off the CUDA EP (or control flow): this graph runs without capture, announced.
                self.graph_refusals[name] = str(exc).strip().splitlines()[0]
                warnings.warn(
                    f"onnxruntime: {name} runs without a CUDA graph: {self.graph_refusals[name]}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                graphs = False
                session = ort.InferenceSession(str(path), options, providers=self._providers(graphs))
        except _ORT_ERRORS as exc:
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        return _Graph(session, info, self.gpu, graphs)

    def session_options(self, name: str, batch: int) -> ort.SessionOptions:
        """How this backend configures the session of graph `name` at `batch` (bundle validation
        uses it too, so it checks the graphs as they run here)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_free_dimension_override_by_name("batch", batch)
        if self.gpu is None:
            _register_shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
            if name not in _LATENT_GRAPHS:
                # A memory pattern allocates a graph's whole planned activation memory as one block
                # per run; the encoder's block cannot hold the decoder's larger one, so the shared
                # arena grows by both and keeps both. Tensor by tensor, the decoder reuses what the
                # encoder freed: knee3d K=8 peak RSS 4.7 -> under 3 GB (the step graph keeps it).
                options.enable_mem_pattern = False
        if self.threads:
            options.intra_op_num_threads = self.threads
        return options

    # ------------------------------------------------------------------ stages
    def plan(self, batch: int, steps: int) -> OrtPlan:
        """Sessions and buffers for `batch` (made once, shared by every step count), plus this step
        count's table, noise and step bindings (made once per (batch, steps))."""
        if batch not in self._pipelines:
            self._pipelines[batch] = BoundPipeline(self, batch)
            self.allocations += 1
        if (batch, steps) not in self._plans:
            self._plans[batch, steps] = OrtPlan(self._pipelines[batch], steps)
        return self._plans[batch, steps]

    def copy_image(self, plan: OrtPlan, image: np.ndarray) -> None:
        plan.pipe.image.write(image)

    def copy_latents(self, plan: OrtPlan, inputs: PipelineInputs) -> int:
        plan.pipe.z[0].write(inputs.z_init)
        plan.table.write(inputs.table[:, None, :])  # one upload of every step's coefficients
        plan.noise.write(inputs.noise)  # and of every step's noise
        return 0

    def broadcast(self, src: OrtPlan, dst: OrtPlan) -> None:
        if src.pipe is not dst.pipe:  # (1, *latent) -> (K, *latent); on CUDA through the host (it is tiny)
            dst.pipe.z_image.write(src.pipe.z_image.read())

    def take(self, src: OrtPlan, z: int, start: int, dst: OrtPlan) -> int:
        dst.pipe.z[0].write(src.pipe.z[z].read()[start : start + dst.pipe.batch])
        return 0

    def encode(self, plan: OrtPlan) -> None:
        plan.pipe.encoder.run()

    def step(self, plan: OrtPlan, z: int, i: int) -> int:
        plan.pipe.step.run(plan.binding(i, z))
        return 1 - z

    def decode(self, plan: OrtPlan, z: int, probabilities: bool) -> None:
        if probabilities:
            plan.pipe.probabilities_graph()[0].run(z)
        else:
            plan.pipe.argmax.run(z)

    def copy_out(self, plan: OrtPlan, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if probabilities:  # labels on the host: the decoder never runs twice
            probs = plan.pipe.probabilities_graph()[1].read()
            return probs.argmax(axis=1).astype(np.uint8), probs
        return plan.pipe.labels.read(), None


def cudnn_search() -> str:
    """The cuDNN algorithm search the CUDA sessions use (module doc); ValueError naming the variable."""
    value = os.environ.get(CUDNN_SEARCH_ENV, "EXHAUSTIVE").upper()
    if value not in CUDNN_SEARCHES:
        raise ValueError(f"{CUDNN_SEARCH_ENV}={value}: choose one of {', '.join(CUDNN_SEARCHES)}")
    return value
