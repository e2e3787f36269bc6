"""ONNX Runtime backend: a bundle's encoder, N fused sampler steps and label decoder, via IOBinding.

Buffers: per batch size, one set of OrtValues is allocated on first use and reused by every later
run: image, z_image, two latent buffers the steps ping-pong between (step i reads one and writes
the other), one coeffs and one noise staging buffer refreshed before each step, and the outputs.
IOBindings are built once per set, so a run is copies into staging buffers plus
run_with_iobinding calls. The step count changes no buffer, so every (batch, steps) with the same
batch shares one set.

Sessions are created per batch with the "batch" axis pinned (add_free_dimension_override_by_name):
ORT then folds the dynamic graph's shape arithmetic into constants, which a CUDA graph needs.

Labels come from decoder_argmax. When probabilities are asked for, the decoder graph runs instead
and labels are its argmax on the host (first maximum, like torch and ONNX ArgMax), so the decoder
never runs twice.

CUDA (device="cuda", needs onnxruntime-gpu): CUDA EP with enable_cuda_graph; ORT captures a graph
on the first runs of each binding, keyed by gpu_graph_id (one per ping-pong parity). This path has
NOT been run: the project's CI and development machines have no GPU with onnxruntime-gpu.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
try:
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
except ImportError as exc:  # neither extra installed: say which one
    from ldseg.runtime.ort_env import missing

    raise missing("the onnxruntime backend") from exc

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.runtime.backend import Backend, PipelineInputs
from ldseg.runtime.bundle import Bundle, GraphInfo, load_bundle

_ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidProtobuf, ort_state.NoSuchFile)
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


class _Tensor:
    """One pre-allocated OrtValue. On CPU it wraps `host` (shared memory, no copies by ORT)."""

    def __init__(self, shape: tuple[int, ...], dtype: str, device: str):
        self.device = device
        self.host = np.zeros(shape, dtype=_DTYPES[dtype])
        if device == "cpu":
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:  # CUDA (not run here): device memory, refreshed with update_inplace
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.host.dtype, "cuda", 0)

    def write(self, array: np.ndarray) -> None:
        np.copyto(self.host, array)  # broadcasts, e.g. one table row to (B, 4)
        if self.device != "cpu":
            self.value.update_inplace(self.host)

    def read(self) -> np.ndarray:
        return self.host.copy() if self.device == "cpu" else self.value.numpy()


class _Graph:
    """A session with its input/output OrtValues bound, optionally one binding per ping-pong parity."""

    def __init__(self, session: ort.InferenceSession, info: GraphInfo, device: str):
        self.session, self.info, self.device = session, info, device
        self.bindings: list[ort.IOBinding] = []
        self.run_options: list[ort.RunOptions | None] = []

    def bind(self, inputs: list[_Tensor], outputs: list[_Tensor]) -> int:
        binding = self.session.io_binding()
        for spec, tensor in zip(self.info.inputs, inputs):
            binding.bind_ortvalue_input(spec.name, tensor.value)
        for spec, tensor in zip(self.info.outputs, outputs):
            binding.bind_ortvalue_output(spec.name, tensor.value)
        options: ort.RunOptions | None = None
        if self.device == "cuda":  # one captured CUDA graph per binding (fixed addresses)
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
    """Sessions, buffers and bindings for one batch size (the plan of every step count)."""

    def __init__(self, backend: OnnxRuntimeBackend, batch: int):
        bundle, dev = backend.bundle, backend.device
        enc, step = bundle.graph("encoder"), bundle.graph("denoise_step")
        argmax = bundle.graph("decoder_argmax")
        self.backend, self.batch = backend, batch
        self.image = _Tensor(enc.inputs[0].concrete(batch), "float32", dev)
        self.z_image = _Tensor(enc.outputs[0].concrete(batch), "float32", dev)
        self.z = [_Tensor(step.inputs[0].concrete(batch), "float32", dev) for _ in range(2)]
        self.coeffs = _Tensor(step.inputs[2].concrete(batch), "float32", dev)
        self.noise = _Tensor(step.inputs[3].concrete(batch), "float32", dev)
        self.labels = _Tensor(argmax.outputs[0].concrete(batch), argmax.outputs[0].dtype, dev)
        self.encoder = backend.graph("encoder", batch)
        self.encoder.bind([self.image], [self.z_image])
        self.step = backend.graph("denoise_step", batch)
        for p in (0, 1):  # binding p reads z[p] and writes z[1 - p]
            self.step.bind([self.z[p], self.z_image, self.coeffs, self.noise], [self.z[1 - p]])
        self.argmax = backend.graph("decoder_argmax", batch)
        for p in (0, 1):
            self.argmax.bind([self.z[p]], [self.labels])
        self.probs: _Tensor | None = None
        self.decoder: _Graph | None = None
        self.inputs: PipelineInputs | None = None  # the run's table and noise, read by each step

    def probabilities_graph(self) -> tuple[_Graph, _Tensor]:
        if self.decoder is None or self.probs is None:  # built on the first run that asks
            info = self.backend.bundle.graph("decoder")
            self.probs = _Tensor(info.outputs[0].concrete(self.batch), "float32", self.backend.device)
            self.decoder = self.backend.graph("decoder", self.batch)
            for p in (0, 1):
                self.decoder.bind([self.z[p]], [self.probs])
        return self.decoder, self.probs


class OnnxRuntimeBackend(Backend[BoundPipeline, int]):
    """Latents are ping-pong buffer indices: step i reads z[p] and returns 1 - p."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle | Path | str, device: str = "cpu", *, threads: int | None = None):
        loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        super().__init__(loaded.config, f"bundle {loaded.preset!r}")
        self.bundle = loaded
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                f"onnxruntime on cuda needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers {', '.join(available)}"
            )
        for name in ("encoder", "denoise_step", "decoder_argmax"):
            self.bundle.graph(name)  # refuse a bundle without the graphs a run needs, now
        self.device = device
        self.precision = self.bundle.precision
        self.threads = threads
        self.allocations = 0  # buffer sets allocated so far (one per batch size)
        self._pipelines: dict[int, BoundPipeline] = {}

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "providers": ", ".join(p for p, _ in self._providers()),
            "cuda_graph": "on" if self.device == "cuda" else "off",
            "bundle": str(self.bundle.path),
            "preset": self.bundle.preset,
        }

    def _providers(self) -> list[tuple[str, dict[str, str]]]:
        if self.device == "cuda":
            return [("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"}), ("CPUExecutionProvider", {})]
        return [("CPUExecutionProvider", {})]

    def graph(self, name: str, batch: int) -> _Graph:
        """A session for one graph with the batch axis pinned to `batch`."""
        info = self.bundle.graph(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_free_dimension_override_by_name("batch", batch)
        if self.device == "cpu":
            _register_shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        if self.threads:
            options.intra_op_num_threads = self.threads
        path = self.bundle.path / info.file
        try:
            session = ort.InferenceSession(str(path), options, providers=self._providers())
        except _ORT_ERRORS as exc:
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        return _Graph(session, info, self.device)

    # ------------------------------------------------------------------ stages
    def plan(self, batch: int, steps: int) -> BoundPipeline:
        """The bound sessions and buffers for `batch` (every step count shares them), made on first use."""
        if batch not in self._pipelines:
            self._pipelines[batch] = BoundPipeline(self, batch)
            self.allocations += 1
        return self._pipelines[batch]

    def copy_in(self, plan: BoundPipeline, inputs: PipelineInputs) -> int:
        plan.image.write(inputs.image)
        plan.z[0].write(inputs.z_init)
        plan.inputs = inputs
        return 0

    def encode(self, plan: BoundPipeline) -> None:
        plan.encoder.run()

    def step(self, plan: BoundPipeline, z: int, i: int) -> int:
        assert plan.inputs is not None
        plan.coeffs.write(plan.inputs.table[i])
        plan.noise.write(plan.inputs.noise[i])
        plan.step.run(z)
        return 1 - z

    def decode(self, plan: BoundPipeline, z: int, probabilities: bool) -> None:
        if probabilities:
            plan.probabilities_graph()[0].run(z)
        else:
            plan.argmax.run(z)

    def copy_out(self, plan: BoundPipeline, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if probabilities:  # labels on the host: the decoder never runs twice
            probs = plan.probabilities_graph()[1].read()
            return probs.argmax(axis=1).astype(np.uint8), probs
        return plan.labels.read(), None
