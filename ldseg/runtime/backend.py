"""The backend lifecycle every runtime implements once (torch, onnxruntime, tensorrt).

In the manner of Polygraphy's runners: `Backend` owns the input check, `close()` / the context
manager and the staged run; each backend implements the stages over buffers it allocates once per
shape (its "plan") and reuses for every later run:

    plan(batch, steps)         the buffers for this shape, made on first use
    copy_image(plan, image)    host image -> the plan's image buffer
    copy_latents(plan, inputs) host z_init, noise, table -> the plan's buffers; returns the initial latent
    encode(plan)               image -> z_image
    broadcast(src, dst)        src's z_image (one image) -> every row of dst's z_image (K chains)
    step(plan, z, i)           one fused sampler step (table row i): latent -> next latent
    take(src, z, start, dst)   latents [start, start + dst's batch) of src -> dst's first latent buffer
    decode(plan, z, probs)     latent -> labels (and probabilities when asked)
    copy_out(plan, probs)      -> host arrays

`Backend._execute` is the one place that calls them in order, for both entry points:

- `run(inputs)`: one image per latent (a batch of B images) or one image and B chains, decoded as
  one batch; what `ldseg-bench` and the tests of B different images use;
- `sample(inputs)`: K samples of one image in bounded memory (`ldseg-run --samples K`). The image
  is encoded once at batch 1 and its latent broadcast to the K chains, which denoise as one batch
  of K (latents are tiny); the decoder then runs in chunks of `decode_chunk(K)` samples (1 on CPU:
  a decoder holds full-resolution activations per sample) and the mean probabilities and the K
  label votes are accumulated chunk by chunk, so no K full-resolution probability volumes are ever
  held at once. Same seeds, same labels: the sum runs sample by sample in float32 in the order
  `probabilities.mean(axis=0)` adds them, so chunking changes no bit of the mean. With
  `resident=True` a backend whose volume ops run on its device keeps the sum, the votes and the maps
  made from them there (`device_samples`, ldseg/runtime/samples.py): only what is written comes back.

Eagerly, or, where a backend captures (`capture`/`replay`, CUDA graphs), encode + broadcast + loop
(+ decode when one chunk holds the batch) as one graph replay. Capture only when it pays: a shape's
first request runs eagerly and the graph is captured by its second (`capture_from`), since a capture
costs several eager runs (on an H200, 1.5 s against a 0.27 s eager knee run) and a one-volume
`ldseg-run` would never replay it; a folder, the API and the service replay from the third on. The
decode chunks of `sample` run eagerly after the graph (one launch each: a graph would buy nothing).
A capture runs the body over the plan's buffers (warm-up, then recording), which overwrites the
latents the loop started from, so after any capture attempt, successful or not, `_execute` copies
the inputs in again: the capturing call, the eager fallback after a failed capture and every replay
all start from the request's own inputs. The loop is `ldseg.model.sampling.denoise_loop`, the
function the PyTorch model samples with, so the sampler is written once. `stage_calls` hands
`ldseg-bench` the same stage methods to time one by one.

Every backend sees the same data, prepared once by `make_inputs`: initial latents, per-step noise
and the coefficient table, so their results are comparable voxel for voxel.

Over 400 lines on purpose: this is the one lifecycle (stages, eager run, capture and replay,
K samples with chunked decode) that every backend and the bench share; splitting it would put
the run's order in two places.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from ldseg.model.config import ModelConfig
from ldseg.model.sampling import denoise_loop, draw_noise, sampler_table
from ldseg.runtime.samples import DeviceSamples, HostSamples, SampleResult
from ldseg.runtime.volume_ops import VolumeOps

STAGES = ("input_copy", "encoder", "step", "loop", "decoder", "output_copy")  # what the bench times


@dataclass(frozen=True)
class PipelineInputs:
    image: np.ndarray  # (B, C, *grid) float32 on the model grid: one image per latent, or (1, C, *grid) for B chains
    z_init: np.ndarray  # (B, 1, *latent) float32, renormalized noise
    noise: np.ndarray  # (steps, B, 1, *latent) float32 (multiplied by 0 under DDIM)
    table: np.ndarray  # (steps, 4) float32 rows [t, a, b, c] in execution order

    @property
    def batch(self) -> int:
        """Latents (denoising chains) in the run."""
        return int(self.z_init.shape[0])

    @property
    def images(self) -> int:
        """Images encoded: `batch`, or 1 when the chains are K samples of one image."""
        return int(self.image.shape[0])

    @property
    def steps(self) -> int:
        return int(self.table.shape[0])


@dataclass
class PipelineOutputs:
    labels: np.ndarray  # (B, *grid) uint8
    probabilities: np.ndarray | None = None  # (B, K, *grid) float32 when asked for
    stage_ms: dict[str, float] = field(default_factory=dict)  # wall/GPU time per stage


@dataclass
class Captured:
    """A graph of encode + loop (+ decode) and the latent it leaves the loop's result in."""

    graph: Any
    latent: Any


class CaptureFailed(RuntimeError):
    """A backend could not capture the pipeline into a graph (the run falls back to eager)."""


class StageClock(Protocol):
    def mark(self, stage: str) -> None: ...

    def result(self) -> dict[str, float]: ...


class HostClock:
    """Milliseconds per stage on the host clock, after waiting for the device at each mark."""

    def __init__(self, synchronize: Callable[[], None]):
        self.synchronize = synchronize
        self.ms: dict[str, float] = {}
        self.last = time.perf_counter()

    def mark(self, stage: str) -> None:
        """Time since the last mark, added to `stage` (decoder chunks add up)."""
        self.synchronize()
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - self.last) * 1e3
        self.last = now

    def result(self) -> dict[str, float]:
        return self.ms


PlanT = TypeVar("PlanT")
LatentT = TypeVar("LatentT")


class Backend(ABC, Generic[PlanT, LatentT]):
    """A runtime over one model artifact; subclasses implement the stages (see the module doc)."""

    name: str  # "torch", "onnxruntime", "tensorrt"
    device: str  # "cpu", "cuda", "cuda:N"
    precision: str  # "fp32", "fp16", "int8", ...

    def __init__(self, config: ModelConfig, artifact: str, *, cuda_graph: bool = False):
        self.config = config  # the model the inputs must fit
        self.artifact = artifact  # how errors name it, e.g. "bundle 'knee3d'"
        self.cuda_graph = cuda_graph  # whole-pipeline capture (backends that implement capture)
        self.fallback_reason: str | None = None  # why capture was given up, once it was
        self.capture_from = 2  # the request of a shape that captures (1: the first; the bench warms up anyway)
        self._graphs: dict[tuple[int, int, int, bool, bool], Captured] = {}
        self._requests: dict[tuple[int, int, int, bool, bool], int] = {}  # per shape, until it is captured

    # ------------------------------------------------------------------ the stages
    @abstractmethod
    def plan(self, batch: int, steps: int) -> PlanT:
        """Buffers (and contexts, sessions...) for this shape: made on the first call, then reused."""

    @abstractmethod
    def copy_image(self, plan: PlanT, image: np.ndarray) -> None:
        """Copy the image (plan's batch, C, *grid) into the plan's image buffer."""

    @abstractmethod
    def copy_latents(self, plan: PlanT, inputs: PipelineInputs) -> LatentT:
        """Copy z_init, noise and the table into the plan's buffers; returns the initial latent."""

    @abstractmethod
    def encode(self, plan: PlanT) -> None: ...

    @abstractmethod
    def broadcast(self, src: PlanT, dst: PlanT) -> None:
        """src's z_image (batch 1) into every row of dst's z_image (the K chains of one image)."""

    @abstractmethod
    def step(self, plan: PlanT, z: LatentT, i: int) -> LatentT:
        """One fused sampler step with table row i."""

    @abstractmethod
    def take(self, src: PlanT, z: LatentT, start: int, dst: PlanT) -> LatentT:
        """Latents [start, start + dst's batch) of src's latent z, as dst's latent (a decoder chunk)."""

    @abstractmethod
    def decode(self, plan: PlanT, z: LatentT, probabilities: bool) -> None: ...

    @abstractmethod
    def copy_out(self, plan: PlanT, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(labels, probabilities or None) as host arrays the caller owns."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What was chosen and why, for the CLI and benchmark records."""

    # ------------------------------------------------------------------ hooks with defaults
    def capture(self, plan: PlanT, body: Callable[[], None]) -> Any:
        """A replayable graph of `body` (warm-up included) over `plan`, or CaptureFailed. Only called
        when `cuda_graph` is set; a backend that sets it implements this and `replay`."""
        raise CaptureFailed(f"the {self.name} backend does not capture graphs")

    def replay(self, plan: PlanT, graph: Any) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for the device (timing); host-synchronous backends need nothing."""

    def clock(self) -> StageClock:
        return HostClock(self.synchronize)

    def prepare(self, batch: int) -> None:
        """Start making what a run at `batch` needs (compiled graphs) where the backend can do that in
        the background; selection calls it so that it overlaps the first input's reading. Optional."""

    def release(self) -> None:
        """Free what the backend allocated (close() calls it once)."""

    # "cpu": the run path's scipy reference even where the device offers its own (--volume-ops cpu).
    volume_path = "auto"

    def volume_ops(self) -> VolumeOps | None:
        """Pre/post-processing on this backend's device (ldseg/runtime/volume_ops.py), or None: the
        run path then resamples on the CPU (always with volume_path "cpu")."""
        return None if self.volume_path == "cpu" else self.device_volume_ops()

    def device_volume_ops(self) -> VolumeOps | None:
        """What this backend offers on its device (backends override it); None: nothing."""
        return None

    def volume_ops_words(self, on_device: str | None) -> str:
        """describe()'s volume_ops entry: where pre/post-processing runs, given the device's words."""
        if on_device is None:
            return "cpu (numpy/scipy)"
        return "cpu (numpy/scipy): --volume-ops cpu" if self.volume_path == "cpu" else on_device

    def device_samples(self, samples: int) -> DeviceSamples | None:
        """An accumulator that keeps `sample`'s result on the device for this backend's volume ops
        (ldseg/runtime/samples.py), or None: host arrays. Backends with device volume ops override it."""
        return None

    def decode_chunk(self, samples: int) -> int:
        """Samples per decoder run in `sample`. The decoder is the one stage whose memory grows with
        the batch at full resolution (knee3d: ~2.5 GB per sample on CPU), so the default is 1: the
        CPU backends' peak then stays that of K=1. GPU backends override it with what fits."""
        return 1

    def copy_in(self, plan: PlanT, inputs: PipelineInputs) -> LatentT:
        """copy_image + copy_latents into one plan (the bench's input_copy stage)."""
        self.copy_image(plan, inputs.image)
        return self.copy_latents(plan, inputs)

    # ------------------------------------------------------------------ the run, written once
    @property
    def mode(self) -> str:
        return "cuda-graph" if self.cuda_graph and self.fallback_reason is None else "eager"

    def loop(self, plan: PlanT, z: LatentT, steps: int) -> LatentT:
        return denoise_loop(z, steps, lambda latent, i: self.step(plan, latent, i))

    def run(self, inputs: PipelineInputs, *, probabilities: bool = False) -> PipelineOutputs:
        """The pipeline on `inputs`, decoded as one batch; buffers are allocated on the first call
        for a shape and reused."""
        out: list[Any] = []
        stage_ms = self._execute(inputs, probabilities, inputs.batch, lambda _, *result: out.append(result))
        labels, probs = out[0]
        return PipelineOutputs(labels=labels, probabilities=probs, stage_ms=stage_ms)

    def sample(self, inputs: PipelineInputs, *, chunk: int | None = None, resident: bool = False) -> SampleResult:
        """K samples of one image (inputs.image of batch 1, K latents): the mean probabilities and
        the K label votes, decoded `chunk` samples at a time (default `decode_chunk(K)`).
        resident: leave them on the device where the backend keeps results there for its own volume
        ops (`device_samples`; ldseg/runtime/samples.py); otherwise, and by default, host arrays."""
        if inputs.images != 1:
            raise ValueError(f"sample takes one image and K latents, got {inputs.images} images")
        k = inputs.batch
        size = max(1, min(k, chunk or self.decode_chunk(k)))
        kept = self.device_samples(k) if resident else None
        samples = kept or HostSamples(k, self.config.image_size)
        stage_ms = self._execute(inputs, True, size, samples.add, fetch=None if kept is None else kept.fetch)
        return samples.result(stage_ms, size)

    def _execute(
        self,
        inputs: PipelineInputs,
        probabilities: bool,
        chunk: int,
        consume: Callable[[int, Any, Any], None],
        fetch: Callable[[PlanT], tuple[Any, Any]] | None = None,
    ) -> dict[str, float]:
        """The one lifecycle: copy in, encode (once per image), broadcast, loop, then decode in
        chunks of `chunk` latents, each handed to `consume(start, labels, probabilities)` as `fetch`
        gives them (default: `copy_out`, host arrays)."""

        def host_arrays(plan: PlanT) -> tuple[Any, Any]:
            return self.copy_out(plan, probabilities)

        fetch = fetch or host_arrays
        check_inputs(inputs, self.config, self.artifact)
        batch, steps = inputs.batch, inputs.steps
        enc = self.plan(inputs.images, steps)
        head = enc if inputs.images == batch else self.plan(batch, steps)
        whole = chunk >= batch
        clock = self.clock()
        z = self._copy_in(enc, head, inputs)
        clock.mark("input_copy")
        captured = None
        if self.cuda_graph:
            captured, attempted = self._graph(enc, head, z, inputs, probabilities, whole)
            if attempted:  # the capture ran the body over the buffers: start again from this request's inputs
                z = self._copy_in(enc, head, inputs)
        if captured is not None:
            self.replay(head, captured.graph)
            z = captured.latent
            clock.mark("graph")
        else:
            self.encode(enc)
            self.broadcast(enc, head)
            clock.mark("encoder")
            z = self.loop(head, z, steps)
            clock.mark("loop")
            if whole:
                self.decode(head, z, probabilities)
                clock.mark("decoder")
        if whole:
            labels, probs = fetch(head)
            clock.mark("output_copy")
            consume(0, labels, probs)
            return clock.result()
        for start in range(0, batch, chunk):
            part = self.plan(min(chunk, batch - start), steps)
            self.decode(part, self.take(head, z, start, part), probabilities)
            clock.mark("decoder")
            labels, probs = fetch(part)
            clock.mark("output_copy")
            consume(start, labels, probs)
            clock.mark("accumulate")
        return clock.result()

    def _copy_in(self, enc: PlanT, head: PlanT, inputs: PipelineInputs) -> LatentT:
        self.copy_image(enc, inputs.image)
        return self.copy_latents(head, inputs)

    def _graph(
        self, enc: PlanT, head: PlanT, z: LatentT, inputs: PipelineInputs, probabilities: bool, whole: bool
    ) -> tuple[Captured | None, bool]:
        """(the graph for this shape or None, whether a capture was attempted by this call)."""
        key = (inputs.images, inputs.batch, inputs.steps, probabilities, whole)
        if key in self._graphs:
            return self._graphs[key], False
        if self.fallback_reason is not None:
            return None, False
        self._requests[key] = seen = self._requests.get(key, 0) + 1
        if seen < self.capture_from:
            return None, False
        final: list[LatentT] = []

        def body() -> None:
            self.encode(enc)
            self.broadcast(enc, head)
            latent = self.loop(head, z, inputs.steps)
            if whole:
                self.decode(head, latent, probabilities)
            final[:] = [latent]  # the last run's (the recorded one's) result latent

        try:
            graph = self.capture(head, body)
        except CaptureFailed as exc:
            self.fallback_reason = f"CUDA-graph capture failed ({exc}); running per-step launches"
            warnings.warn(self.fallback_reason, RuntimeWarning, stacklevel=4)  # the caller of run/sample
            return None, True
        self._graphs[key] = captured = Captured(graph, final[-1])
        return captured, True

    def stage_calls(self, inputs: PipelineInputs) -> dict[str, Callable[[], object]]:
        """One callable per STAGES entry over this backend's own stage methods, for the bench. Called
        in STAGES order, each finds what the previous left; each waits for the device before returning."""
        check_inputs(inputs, self.config, self.artifact)
        plan = self.plan(inputs.batch, inputs.steps)
        latents: dict[str, Any] = {}

        def input_copy() -> None:
            latents["init"] = self.copy_in(plan, inputs)

        def one_step() -> None:  # reads the initial latent, writes the other buffer: the loop is unaffected
            self.step(plan, latents["init"], 0)

        def loop() -> None:
            latents["final"] = self.loop(plan, latents["init"], inputs.steps)

        calls: dict[str, Callable[[], object]] = {
            "input_copy": input_copy,
            "encoder": lambda: self.encode(plan),
            "step": one_step,
            "loop": loop,
            "decoder": lambda: self.decode(plan, latents["final"], False),
            "output_copy": lambda: self.copy_out(plan, False),
        }

        def synchronized(call: Callable[[], object]) -> Callable[[], object]:
            def timed() -> object:
                result = call()
                self.synchronize()
                return result

            return timed

        return {name: synchronized(calls[name]) for name in STAGES}

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if not getattr(self, "_closed", False):
            self._closed = True
            self.release()

    def __enter__(self: BackendT) -> BackendT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BackendT = TypeVar("BackendT", bound=Backend[Any, Any])


def check_inputs(inputs: PipelineInputs, cfg: ModelConfig, owner: str) -> None:
    """ValueError naming the array whose shape does not fit `cfg` (owner: what expects it). The
    image batch is the latent batch, or 1 (K chains of one image)."""
    n, b = inputs.steps, inputs.batch
    images = 1 if inputs.images == 1 else b
    expected = {
        "image": (inputs.image.shape, (images, *cfg.image_shape)),
        "z_init": (inputs.z_init.shape, (b, *cfg.latent_shape)),
        "noise": (inputs.noise.shape, (n, b, *cfg.latent_shape)),
        "table": (inputs.table.shape, (n, 4)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, {owner} expects {want}")


def make_inputs(
    cfg: ModelConfig,
    image: np.ndarray,
    seeds: list[int],
    steps: int | None = None,
    sampler: str | None = None,
) -> PipelineInputs:
    """Inputs for `image` (B, C, *grid) with one seed per image, or (1, C, *grid) with K seeds (K samples)."""
    if image.shape[1:] != cfg.image_shape:
        raise ValueError(f"image of shape {image.shape[1:]} for a model expecting {cfg.image_shape}")
    if len(seeds) != image.shape[0] and image.shape[0] != 1:
        raise ValueError(f"{len(seeds)} seeds for a batch of {image.shape[0]} (give one seed per image, or one image)")
    table = sampler_table(cfg.diffusion, steps, sampler)
    z_init, noise = draw_noise(seeds, table.steps, cfg.latent_shape)
    return PipelineInputs(
        image=np.ascontiguousarray(image, dtype=np.float32),
        z_init=z_init,
        noise=noise,
        table=table.rows.astype(np.float32),
    )
