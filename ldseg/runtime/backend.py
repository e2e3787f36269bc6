"""The backend lifecycle every runtime implements once (torch, onnxruntime, tensorrt).

In the manner of Polygraphy's runners: `Backend` owns the input check, `close()` / the context
manager and the staged run; each backend implements the stages over buffers it allocates once per
shape (its "plan") and reuses for every later run:

    plan(batch, steps)         the buffers for this shape, made on first use
    copy_in(plan, inputs)      host arrays -> the plan's buffers; returns the initial latent
    encode(plan)               image -> z_image
    step(plan, z, i)           one fused sampler step (table row i): latent -> next latent
    decode(plan, z, probs)     latent -> labels (and probabilities when asked)
    copy_out(plan, probs)      -> host arrays

`Backend.run` is the one place that calls them in order: eagerly, or, where a backend captures
(`capture`/`replay`, CUDA graphs), encode + loop + decode as one graph replay. The loop is
`ldseg.model.sampling.denoise_loop`, the function the PyTorch model samples with, so the sampler
is written once. `stage_calls` hands `ldseg-bench` the same stage methods to time one by one.

Every backend sees the same data, prepared once by `make_inputs`: initial latents, per-step noise
and the coefficient table, so their results are comparable voxel for voxel.
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

STAGES = ("input_copy", "encoder", "step", "loop", "decoder", "output_copy")  # what the bench times


@dataclass(frozen=True)
class PipelineInputs:
    image: np.ndarray  # (B, C, *grid) float32, on the model grid
    z_init: np.ndarray  # (B, 1, *latent) float32, renormalized noise
    noise: np.ndarray  # (steps, B, 1, *latent) float32 (multiplied by 0 under DDIM)
    table: np.ndarray  # (steps, 4) float32 rows [t, a, b, c] in execution order

    @property
    def batch(self) -> int:
        return int(self.image.shape[0])

    @property
    def steps(self) -> int:
        return int(self.table.shape[0])


@dataclass
class PipelineOutputs:
    labels: np.ndarray  # (B, *grid) uint8
    probabilities: np.ndarray | None = None  # (B, K, *grid) float32 when asked for
    stage_ms: dict[str, float] = field(default_factory=dict)  # wall/GPU time per stage


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
        self.synchronize()
        now = time.perf_counter()
        self.ms[stage] = (now - self.last) * 1e3
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
        self._graphs: dict[tuple[int, int, bool], Any] = {}

    # ------------------------------------------------------------------ the stages
    @abstractmethod
    def plan(self, batch: int, steps: int) -> PlanT:
        """Buffers (and contexts, sessions...) for this shape: made on the first call, then reused."""

    @abstractmethod
    def copy_in(self, plan: PlanT, inputs: PipelineInputs) -> LatentT:
        """Copy the inputs into the plan's buffers; returns the initial latent."""

    @abstractmethod
    def encode(self, plan: PlanT) -> None: ...

    @abstractmethod
    def step(self, plan: PlanT, z: LatentT, i: int) -> LatentT:
        """One fused sampler step with table row i."""

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

    # ------------------------------------------------------------------ the run, written once
    @property
    def mode(self) -> str:
        return "cuda-graph" if self.cuda_graph and self.fallback_reason is None else "eager"

    def loop(self, plan: PlanT, z: LatentT, steps: int) -> LatentT:
        return denoise_loop(z, steps, lambda latent, i: self.step(plan, latent, i))

    def run(self, inputs: PipelineInputs, *, probabilities: bool = False) -> PipelineOutputs:
        """The pipeline on `inputs`; buffers are allocated on the first call for a shape and reused."""
        check_inputs(inputs, self.config, self.artifact)
        plan = self.plan(inputs.batch, inputs.steps)
        clock = self.clock()
        z = self.copy_in(plan, inputs)
        clock.mark("input_copy")
        graph = self._graph(plan, z, inputs, probabilities) if self.cuda_graph else None
        if graph is not None:
            self.replay(plan, graph)
            clock.mark("graph")
        else:
            self.encode(plan)
            clock.mark("encoder")
            z = self.loop(plan, z, inputs.steps)
            clock.mark("loop")
            self.decode(plan, z, probabilities)
            clock.mark("decoder")
        labels, probs = self.copy_out(plan, probabilities)
        clock.mark("output_copy")
        return PipelineOutputs(labels=labels, probabilities=probs, stage_ms=clock.result())

    def _graph(self, plan: PlanT, z: LatentT, inputs: PipelineInputs, probabilities: bool) -> Any:
        key = (inputs.batch, inputs.steps, probabilities)
        if key in self._graphs:
            return self._graphs[key]
        if self.fallback_reason is not None:
            return None

        def body() -> None:
            self.encode(plan)
            self.decode(plan, self.loop(plan, z, inputs.steps), probabilities)

        try:
            graph = self.capture(plan, body)
        except CaptureFailed as exc:
            self.fallback_reason = f"CUDA-graph capture failed ({exc}); running per-step launches"
            warnings.warn(self.fallback_reason, RuntimeWarning, stacklevel=4)
            return None
        self._graphs[key] = graph
        return graph

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
    """ValueError naming the array whose shape does not fit `cfg` (owner: what expects it)."""
    n, b = inputs.steps, inputs.batch
    expected = {
        "image": (inputs.image.shape, (b, *cfg.image_shape)),
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
    if image.shape[1:] != cfg.image_shape:
        raise ValueError(f"image of shape {image.shape[1:]} for a model expecting {cfg.image_shape}")
    if len(seeds) != image.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {image.shape[0]}")
    table = sampler_table(cfg.diffusion, steps, sampler)
    z_init, noise = draw_noise(seeds, table.steps, cfg.latent_shape)
    return PipelineInputs(
        image=np.ascontiguousarray(image, dtype=np.float32),
        z_init=z_init,
        noise=noise,
        table=table.rows.astype(np.float32),
    )
