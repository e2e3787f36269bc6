"""TensorRT backend: the whole pipeline from an engine set, captured once into one CUDA graph.

Before TensorRT sees a byte, the engine set is checked against this machine (runtime/artifacts/engines.py):
TensorRT version, GPU model and compute capability, the SHA-256 of every engine and, when given,
the bundle it was built from. A set for another machine is refused with BackendUnavailable, a
broken one with ArtifactError; both say why and how to rebuild.

Memory, allocated once per batch size (all device buffers from cudaMalloc, 256-byte aligned):
    image, z_image, z[0], z[1] (the latents the steps ping-pong between), a coeffs slot (B, 4) and
    a noise slot (B, *latent) that every step reads, labels, probabilities,
    pinned host mirrors of the inputs and outputs (captured copies need page-locked memory),
and per (batch, steps): the device table of step coefficients (steps, B, 4) and the pre-drawn
noise (steps, B, *latent). Every execution context is USER_MANAGED and shares one activation
buffer of max(device_memory_size_v2): they all run one after another on one stream.

Contexts, each with its tensor addresses set once and never changed (a CUDA graph bakes them in,
and TensorRT may keep host-side copies of them that a later re-bind would overwrite):
    encoder:            image -> z_image
    denoise_step A / B: z[0] -> z[1]  /  z[1] -> z[0]   (same coeffs and noise slots)
    decoder(_argmax) A / B: z[0] -> out  /  z[1] -> out
The stages (ldseg/runtime/backend.py) all enqueue on one stream: copy_image / copy_latents fill the
pinned mirrors and copy them host->device; encode; broadcast copies the batch-1 plan's z_image into
every row of the batch-K plan's (device->device, `sample`); step i copies table row i and noise i
into the slots (device->device) and runs A or B by the parity it reads; take copies a chunk of the
final latents into the chunk plan's z[0]; decode runs decoder(_argmax) on the parity the last step
wrote; copy_out copies the output device->host and syncs. encode + broadcast + loop (+ decode when
the batch is decoded in one chunk) run once eagerly (TensorRT allocates on the first enqueue after a
shape change), then are captured in thread-local mode into one CUDA graph per shape; a run is then:
the input copies, one graph launch, (the decoder chunks,) the output copy, one sync.

The eager warm-up inside `capture` ping-pongs through z[0] and z[1] and so overwrites z[0], the
initial latent the captured graph starts from; nothing in the graph restores it (its copies read
z[0] in place). The lifecycle therefore copies the request's inputs in again after every capture
attempt (Backend._execute): the capturing call replays from the request's z_init, like every later
replay, and the eager fallback after a failed capture starts from it too. (Before that rule, the
first run of every shape replayed from step 13's output: tests/tensorrt/test_emulated_backend.py.)
If an enqueue returns false, the capture is invalidated or instantiation fails, the capture is
ended, the CUDA error cleared, and the backend warns once with the reason and runs the same stages
eagerly (per-step launches) from then on.

Decoder chunks (`decode_chunk`): min(K, the engines' max batch). Every context shares one activation
buffer already sized for the largest profile batch, so any chunk up to it needs no more activation
memory, only its (chunk, classes, *grid) probability buffer; K itself must fit the profile (the
loop runs as one batch of K).

Pre- and post-processing (`volume_ops`): where the engine set has the volume engines (build-engine
makes them for 3D models), runtime/backends/tensorrt/volume.py runs them on their own stream and
buffers; otherwise the run path resamples on the CPU.

Probabilities (always asked by `ldseg-run`, which averages samples) come from the decoder engine;
labels are then their argmax on the host (first maximum, like torch and ONNX ArgMax), so the
decoder never runs twice. Without probabilities, decoder_argmax writes uint8 labels on the GPU. With
the volume engines and K = 1, `sample(resident=True)` (the run path's call) keeps the probabilities on
the GPU instead, for the volume engines to read there (samples.py).

NOT RUN: TensorRT cannot be installed on the development machines and they have no GPU. This file
is type-checked against tensorrt-stubs 10.13 (no stubs exist for 11); what differs between
TensorRT 10 and 11 goes through runtime/backends/tensorrt/compat.py, unit-tested with faked 10.x and 11.x
modules; tests/tensorrt has real-engine tests that skip here.

Over 400 lines because the engine contexts, the plan of device buffers per shape and the stages
that enqueue on them share one stream and one set of addresses; split apart, each would reach
into the others' buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.runtime.artifacts.bundle import TensorInfo
from ldseg.runtime.artifacts.engines import EngineSet, engine_set_problems, read_engine_set
from ldseg.runtime.backend import STAGES, Backend, CaptureFailed, PipelineInputs
from ldseg.runtime.backends.tensorrt import compat as trt_compat
from ldseg.runtime.backends.tensorrt import cuda
from ldseg.runtime.backends.tensorrt.engine_runner import EngineRunner
from ldseg.runtime.backends.tensorrt.probe import detect_environment, logged_errors, require_tensorrt, trt_logger
from ldseg.runtime.backends.tensorrt.samples import SAMPLE_ENGINES, TrtOneSample, TrtSamples
from ldseg.runtime.backends.tensorrt.volume import TrtVolumeOps

if TYPE_CHECKING:
    import tensorrt as trt

_NUMPY_OF_TRT = {
    "FLOAT": "float32",
    "HALF": "float16",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


class EnqueueFailed(BackendUnavailable):
    """execute_async_v3 returned false (inside a capture: the capture fails; eagerly: the run)."""


def parse_device(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N; anything else is refused (TensorRT runs on NVIDIA GPUs only)."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendUnavailable(
        f"the TensorRT backend runs on an NVIDIA GPU: device must be 'cuda' or 'cuda:N', got {device!r}"
    )


def check_usable(engines_dir: Path, environment_problems: list[str], artifact_problems: list[str]) -> None:
    """Raise the right error for the problems found: a set for another machine is
    BackendUnavailable (rebuild here), a broken or foreign set ArtifactError."""
    if artifact_problems:
        raise ArtifactError(f"{engines_dir}: engine set refused: {'; '.join(artifact_problems)}")
    if environment_problems:
        raise BackendUnavailable(
            f"{engines_dir}: engines were built for another machine: {'; '.join(environment_problems)}. "
            "Rebuild them here: ldseg-export build-engine BUNDLE -o ENGINES"
        )


class _Context:
    """One execution context on the shared activation memory, with fixed shapes and addresses."""

    def __init__(
        self,
        graph: str,
        engine: trt.ICudaEngine,
        activation: cuda.DeviceBuffer,
        stream: cuda.Stream,
        bindings: dict[str, tuple[int, tuple[int, ...]]],  # tensor name -> (address, shape)
        logger: trt.ILogger,
    ):
        import tensorrt as trt

        self.graph, self.logger = graph, logger
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:  # the binding returns None on failure; the stubs do not say so
            raise BackendUnavailable(
                f"TensorRT could not create an execution context for {graph}: {logged_errors(logger)}"
            )
        trt_compat.set_device_memory(context, activation.ptr, activation.nbytes)
        try:  # a refusal raises (the bool it returns is true whenever it returns)
            accepted = context.set_optimization_profile_async(0, stream.ptr)
        except RuntimeError as exc:
            reason = f"{exc} ({logged_errors(logger)})"
            raise BackendUnavailable(f"{graph}: TensorRT refused optimization profile 0: {reason}") from exc
        if not accepted:
            raise BackendUnavailable(f"{graph}: TensorRT refused optimization profile 0: {logged_errors(logger)}")
        for name, (_, shape) in bindings.items():
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT and not context.set_input_shape(name, shape):
                raise ArtifactError(f"{graph}: input {name} of shape {shape} is outside the engine's profile")
        unresolved = context.infer_shapes()
        if unresolved:
            raise ArtifactError(f"{graph}: TensorRT cannot infer the shapes of {', '.join(unresolved)}")
        for name, (address, shape) in bindings.items():
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                got = tuple(context.get_tensor_shape(name))
                if got != shape:
                    raise ArtifactError(f"{graph}: output {name} has shape {got}, expected {shape}")
            if address % cuda.ALIGNMENT or not context.set_tensor_address(name, address):
                raise BackendUnavailable(f"{graph}: TensorRT refused the address of {name}")
        self.context = context

    def enqueue(self, stream: cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise EnqueueFailed(f"execute_async_v3 of {self.graph} returned false: {logged_errors(self.logger)}")


@dataclass
class _Device:
    """A device buffer with its shape and dtype, plus a pinned host mirror when it crosses over."""

    shape: tuple[int, ...]
    dtype: np.dtype
    buffer: cuda.DeviceBuffer
    host: cuda.PinnedArray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @staticmethod
    def make(shape: tuple[int, ...], dtype: str, pinned: bool) -> _Device:
        np_dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        return _Device(
            shape, np_dtype, cuda.DeviceBuffer(nbytes), cuda.PinnedArray(shape, np_dtype) if pinned else None
        )

    def free(self) -> None:
        self.buffer.free()
        if self.host is not None:
            self.host.free()


class _Batch:
    """Buffers and contexts for one batch size (shared by every step count)."""

    def __init__(self, backend: TensorRTBackend, batch: int):
        es = backend.engine_set
        enc, step = es.engines["encoder"], es.engines["denoise_step"]
        self.batch = batch
        self.image = _Device.make(enc.inputs[0].concrete(batch), "float32", pinned=True)
        self.z_image = _Device.make(enc.outputs[0].concrete(batch), "float32", pinned=False)
        self.z = [
            _Device.make(step.inputs[0].concrete(batch), "float32", pinned=i == 0) for i in range(2)
        ]  # z[0] <- z_init
        self.coeffs = _Device.make(step.inputs[2].concrete(batch), "float32", pinned=False)
        self.noise = _Device.make(step.inputs[3].concrete(batch), "float32", pinned=False)
        argmax = es.engines["decoder_argmax"].outputs[0]
        self.labels = _Device.make(argmax.concrete(batch), argmax.dtype, pinned=True)
        ctx = backend.context
        self.encoder = ctx("encoder", {"image": self.image, "z_image": self.z_image})
        self.steps = [
            ctx("denoise_step", {"z": self.z[p], "z_image": self.z_image, "coeffs": self.coeffs,
                                 "noise": self.noise, "z_next": self.z[1 - p]})
            for p in (0, 1)
        ]  # fmt: skip
        self.argmax = [ctx("decoder_argmax", {"z": self.z[p], "labels": self.labels}) for p in (0, 1)]
        self.probs: _Device | None = None
        self.decoder: list[_Context] = []
        if "decoder" in es.engines:
            out = es.engines["decoder"].outputs[0]
            self.probs = _Device.make(out.concrete(batch), out.dtype, pinned=True)
            self.decoder = [ctx("decoder", {"z": self.z[p], out.name: self.probs}) for p in (0, 1)]

    def buffers(self) -> list[_Device]:
        return [
            self.image,
            self.z_image,
            *self.z,
            self.coeffs,
            self.noise,
            self.labels,
            *([self.probs] if self.probs else []),
        ]


class _Steps:
    """The per-step tables of one (batch, steps): coefficients and noise, on device and pinned."""

    def __init__(self, batch: _Batch, steps: int):
        self.steps = steps
        self.table = _Device.make((steps, *batch.coeffs.shape), "float32", pinned=True)
        self.noise = _Device.make((steps, *batch.noise.shape), "float32", pinned=True)


@dataclass
class _Plan:
    b: _Batch
    s: _Steps


class _EventClock:
    """Stage times from CUDA events on the backend's stream: no host sync between stages. A stage
    marked several times (the decoder chunks of `sample`) adds up."""

    def __init__(self, backend: TensorRTBackend):
        self.backend = backend
        self.names: list[str] = []
        backend.event(0).record(backend.stream)

    def mark(self, stage: str) -> None:
        self.names.append(stage)
        self.backend.event(len(self.names)).record(self.backend.stream)

    def result(self) -> dict[str, float]:
        ev = self.backend._events
        self.backend.stream.synchronize()
        out: dict[str, float] = {}
        for i, name in enumerate(self.names):
            out[name] = out.get(name, 0.0) + ev[i + 1].ms_since(ev[i])
        return out


class TensorRTBackend(Backend[_Plan, int]):
    """Latents are ping-pong buffer indices: step i reads z[p], writes z[1 - p] and returns 1 - p."""

    name = "tensorrt"

    def __init__(
        self,
        engines_dir: Path | str,
        device: str = "cuda",
        *,
        bundle_hash: str | None = None,
        cuda_graph: bool = True,
    ):
        self.engines_dir = Path(engines_dir)
        self.device = device
        index = parse_device(device)
        require_tensorrt()
        import tensorrt as trt

        self.environment = detect_environment(index)  # BackendUnavailable: no TensorRT / no GPU
        problems = engine_set_problems(self.engines_dir, self.environment, bundle_hash=bundle_hash)
        check_usable(
            self.engines_dir,
            [p.message for p in problems if p.kind == "environment"],
            [p.message for p in problems if p.kind == "artifact"],
        )
        self.engine_set: EngineSet = read_engine_set(self.engines_dir)
        super().__init__(self.engine_set.config, f"engines for {self.engine_set.preset!r}", cuda_graph=cuda_graph)
        self.precision = self.engine_set.precision
        cuda.set_device(index)
        self.gpu_index = index
        self.logger = trt_logger()
        self.runtime = trt.Runtime(self.logger)
        if self.engine_set.dla_core is not None:
            self.runtime.DLA_core = self.engine_set.dla_core
        self.engines = {graph: self._load_engine(graph) for graph in self.engine_set.engines}
        self._volume_ops = (
            TrtVolumeOps(self.engine_set, self._load_engine, index) if self.engine_set.volume_engines else None
        )
        self.stream = cuda.Stream()
        # One activation buffer for every context: they never run concurrently (one stream).
        self.activation = cuda.DeviceBuffer(max(trt_compat.device_memory_size(e) for e in self.engines.values()))
        self._batches: dict[int, _Batch] = {}
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._events = [cuda.Event() for _ in range(len(STAGES) + 1)]
        self._sample_runner: EngineRunner | None = None  # the sample engines, made for the first K > 1

    # ------------------------------------------------------------------ setup

    def _load_engine(self, graph: str) -> trt.ICudaEngine:
        """Deserialize one engine of the set and check its I/O against engines.json."""
        path = self.engine_set.engine_path(graph)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:  # the binding returns None on failure; the stubs do not say so
            raise ArtifactError(f"{path}: TensorRT cannot deserialize it: {logged_errors(self.logger)}")
        entry = {**self.engine_set.engines, **self.engine_set.volume_engines}[graph]
        self._check_io(graph, engine, entry.inputs, entry.outputs)
        return engine

    def _check_io(
        self, graph: str, engine: trt.ICudaEngine, inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...]
    ) -> None:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        expected = {t.name: (t, trt.TensorIOMode.INPUT) for t in inputs} | {
            t.name: (t, trt.TensorIOMode.OUTPUT) for t in outputs
        }
        if sorted(names) != sorted(expected):
            raise ArtifactError(f"{graph}: engine I/O {sorted(names)} does not match {sorted(expected)}")
        for name in names:
            tensor, mode = expected[name]
            dtype = _NUMPY_OF_TRT.get(engine.get_tensor_dtype(name).name, "?")
            if engine.get_tensor_mode(name) != mode or dtype != tensor.dtype:
                raise ArtifactError(f"{graph}: engine tensor {name} is {dtype}, expected {tensor.dtype}")

    def context(self, graph: str, tensors: dict[str, _Device]) -> _Context:
        bindings = {name: (dev.buffer.ptr, dev.shape) for name, dev in tensors.items()}
        return _Context(graph, self.engines[graph], self.activation, self.stream, bindings, self.logger)

    def _batch(self, batch: int) -> _Batch:
        if batch not in self._batches:
            profile = self.engine_set.profiles["encoder"]
            if not all(p.accepts(batch) for p in self.engine_set.profiles.values()):
                raise ArtifactError(
                    f"{self.engines_dir}: engines accept batch {profile.min_batch}..{self.engine_set.max_batch}, "
                    f"this run needs {batch}: rebuild with --max-batch {batch}"
                )
            self._batches[batch] = _Batch(self, batch)
        return self._batches[batch]

    # ------------------------------------------------------------------ stages (enqueued on one stream)

    def plan(self, batch: int, steps: int) -> _Plan:
        key = (batch, steps)
        if key not in self._plans:
            b = self._batch(batch)
            self._plans[key] = _Plan(b, _Steps(b, steps))
        return self._plans[key]

    def copy_image(self, plan: _Plan, image: np.ndarray) -> None:
        """Fill the pinned mirror, then copy it host -> device on the stream."""
        dev = plan.b.image
        assert dev.host is not None
        self.stream.synchronize()  # an earlier run's enqueued copy may still read the mirror
        np.copyto(dev.host.array, image)
        self.stream.copy_htod(dev.buffer.ptr, dev.host.ptr, dev.nbytes)

    def copy_latents(self, plan: _Plan, inputs: PipelineInputs) -> int:
        b, s = plan.b, plan.s
        assert b.z[0].host and s.table.host and s.noise.host
        self.stream.synchronize()
        np.copyto(b.z[0].host.array, inputs.z_init)
        np.copyto(s.table.host.array, inputs.table[:, None, :])  # one row per step, for every sample
        np.copyto(s.noise.host.array, inputs.noise)
        for dev in (b.z[0], s.table, s.noise):
            assert dev.host is not None
            self.stream.copy_htod(dev.buffer.ptr, dev.host.ptr, dev.nbytes)
        return 0

    def broadcast(self, src: _Plan, dst: _Plan) -> None:
        if src.b is dst.b:
            return
        one = src.b.z_image
        for k in range(dst.b.batch):  # (1, *latent) -> every row of (K, *latent), device -> device
            self.stream.copy_dtod(dst.b.z_image.buffer.ptr + k * one.nbytes, one.buffer.ptr, one.nbytes)

    def take(self, src: _Plan, z: int, start: int, dst: _Plan) -> int:
        row = src.b.z[z].nbytes // src.b.batch
        self.stream.copy_dtod(dst.b.z[0].buffer.ptr, src.b.z[z].buffer.ptr + start * row, dst.b.batch * row)
        return 0

    def decode_chunk(self, samples: int) -> int:
        return max(1, min(samples, self.engine_set.max_batch))

    def encode(self, plan: _Plan) -> None:
        plan.b.encoder.enqueue(self.stream)

    def step(self, plan: _Plan, z: int, i: int) -> int:
        """Table row i and noise i into the step's slots (device -> device), then the context for z."""
        b, s, st = plan.b, plan.s, self.stream
        st.copy_dtod(b.coeffs.buffer.ptr, s.table.buffer.ptr + i * b.coeffs.nbytes, b.coeffs.nbytes)
        st.copy_dtod(b.noise.buffer.ptr, s.noise.buffer.ptr + i * b.noise.nbytes, b.noise.nbytes)
        b.steps[z].enqueue(st)
        return 1 - z

    def decode(self, plan: _Plan, z: int, probabilities: bool) -> None:
        b = plan.b
        if probabilities and b.probs is None:
            raise ArtifactError(
                f"{self.engines_dir}: no decoder engine, so no probabilities; rebuild from a bundle with a decoder"
            )
        (b.decoder if probabilities else b.argmax)[z].enqueue(self.stream)

    def copy_out(self, plan: _Plan, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        b = plan.b
        out = b.probs if probabilities else b.labels
        assert out is not None and out.host is not None
        self.stream.copy_dtoh(out.host.ptr, out.buffer.ptr, out.nbytes)
        self.stream.synchronize()
        if probabilities:  # labels on the host (first maximum, like ONNX ArgMax): the decoder runs once
            probs = out.host.array.copy()
            return probs.argmax(axis=1).astype(np.uint8), probs
        return out.host.array.copy(), None

    def clock(self) -> _EventClock:
        return _EventClock(self)

    def event(self, i: int) -> cuda.Event:
        """The i-th timing event, made on first use (K decoder chunks need more than STAGES)."""
        while len(self._events) <= i:
            self._events.append(cuda.Event())
        return self._events[i]

    def synchronize(self) -> None:
        self.stream.synchronize()

    # ------------------------------------------------------------------ CUDA graph

    def capture(self, plan: _Plan, body: Callable[[], None]) -> cuda.CudaGraph:
        """One eager run first (the first enqueues after shape setup allocate), then a thread-local
        capture. Both leave z[0] overwritten: the lifecycle copies the inputs in again after this."""
        try:
            body()
            self.stream.synchronize()
        except (EnqueueFailed, cuda.CudaError) as exc:
            raise CaptureFailed(f"eager warm-up failed: {exc}") from exc
        capture = cuda.GraphCapture(self.stream)
        failure: str | None = None
        try:
            body()
        except (EnqueueFailed, cuda.CudaError) as exc:
            failure = str(exc)
        graph = capture.end(failure is None, failure)
        if graph is None:
            raise CaptureFailed(capture.reason or "unknown reason")
        return graph

    def replay(self, plan: _Plan, graph: cuda.CudaGraph) -> None:
        graph.launch(self.stream)

    # ------------------------------------------------------------------ Backend

    def describe(self) -> dict[str, str]:
        es = self.engine_set
        out = {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "mode": self.mode,
            "engines": str(self.engines_dir),
            "tensorrt": self.environment.trt_version,
            "gpu": f"{self.environment.gpu_name} (sm {self.environment.compute_capability})",
            "batch": f"{es.min_batch}..{es.max_batch}",
            "volume_ops": self.volume_ops_words(self._volume_ops.describe() + self._samples_words())
            if self._volume_ops is not None
            else "cpu (numpy/scipy): the engine set has no volume engines (build-engine makes them for 3D models)",
        }
        if self.fallback_reason:
            out["fallback"] = self.fallback_reason
        return out

    def device_volume_ops(self) -> TrtVolumeOps | None:
        return self._volume_ops

    def device_samples(self, samples: int) -> TrtOneSample | TrtSamples | None:
        """The samples kept on the GPU for the volume engines (samples.py): one by a copy, K > 1 by
        the sample engines where the set has them and its profiles take K; otherwise host arrays."""
        ops, decoder = self.volume_ops(), self.engine_set.engines.get("decoder")
        if not isinstance(ops, TrtVolumeOps) or decoder is None or decoder.outputs[0].dtype != "float32":
            return None
        if samples == 1:
            return TrtOneSample(self.stream, ops.kept)
        if not self.sample_engines_take(samples):
            return None
        if self._sample_runner is None:  # on the model's stream: the sums follow the decoder without a sync
            self._sample_runner = EngineRunner(self.engine_set, self._load_engine, self.gpu_index, self.stream)
        config = self.config
        return TrtSamples(self._sample_runner, ops.kept, ops, samples, config.image_size, config.num_classes)

    def sample_engines_take(self, samples: int) -> bool:
        """Whether the set has the sample engines and their profile takes `samples` votes."""
        most = self._most_samples()
        return most is not None and 1 <= samples <= most

    def _most_samples(self) -> int | None:
        """The largest K the sample engines take, or None: the set has none."""
        if not all(g in self.engine_set.volume_engines for g in SAMPLE_ENGINES):
            return None
        votes = {p.name: p for p in self.engine_set.volume_profiles.get("sample_entropy", ())}.get("votes")
        return None if votes is None else votes.max[0]

    def _samples_words(self) -> str:
        most = self._most_samples()
        if most is None:
            return "; K > 1 samples averaged on the host (no sample engines in the set)"
        return f"; K samples averaged there too (sample engines, K <= {most})"

    def release(self) -> None:
        """Free graphs, buffers and the stream (engines and contexts go with the object)."""
        self.stream.synchronize()
        if self._sample_runner is not None:
            self._sample_runner.release()
        if self._volume_ops is not None:
            self._volume_ops.release()
        for captured in self._graphs.values():
            captured.graph.destroy()
        self._graphs.clear()
        for plan in self._plans.values():
            plan.s.table.free()
            plan.s.noise.free()
        for b in self._batches.values():
            for dev in b.buffers():
                dev.free()
        self._plans.clear()
        self._batches.clear()
        for event in self._events:
            event.destroy()
        self.activation.free()
        self.stream.destroy()
