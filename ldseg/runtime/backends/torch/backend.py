"""PyTorch backend: the FP32 reference, and BF16/FP16 autocast (CPU or CUDA).

On CUDA the whole pipeline — encoder, N fused steps, decoder with argmax (for `sample`: encoder,
broadcast and steps, the decoder chunks after it eagerly) — is captured once per shape, by the
shape's second request (the first runs eagerly: ldseg/runtime/backend.py), into a
torch.cuda.CUDAGraph over the plan's static buffers; a request copies its inputs into those buffers,
replays, and reads the outputs: no Python work, allocation or host sync inside. Where capture fails
the backend warns once with the reason and runs the same stages eagerly (ldseg/runtime/backend.py).

Capture and the inputs: every stage returns new tensors and none writes the plan's input buffers
(image, z_init, noise, table), so the two warm-up runs and the recorded one leave the inputs as
they were; the lifecycle's copy-in after a capture attempt is therefore a no-op in effect here.

Decoder chunks on CUDA (`decode_chunk`): as many samples as fit in half the free device memory at
DECODER_BYTES_PER_VOXEL per sample (an upper estimate of the decoder's full-resolution activations);
on CPU one sample per chunk.

The model it is handed is never modified: a model on another device, or in training mode, is copied
(a model shared with an exporter must stay where it was), and so is one made lean.

`lean=True` (what `ldseg-run` and the API make: declaration.py) runs the model's lean form, the
exported graphs' rewrites (ldseg/model/rewrites.py): phase-form upsampling, BatchNorm folded into
its conv, one q/k/v matrix per attention block. `lean=False` (the default) is the official form: the
FP32 reference of export validation, ldseg-bench and gpu_check.

"fp32" is FP32 math: cuDNN convolutions and matmuls default to TF32 on Ampere and later, so every
stage (and the graph capture, which bakes the kernels in) runs under `strict_fp32()`, which turns
TF32 off and restores the caller's settings afterwards: no global state is left changed.

"bf16" (CPU or CUDA) and "fp16" (CUDA) run the encoder, each denoiser step and the decoder under
torch.autocast, whose convolutions and matmuls take the reduced type. FP32 islands, where the
model's own code puts them (a branch on the tensor's dtype, so exported graphs are unchanged):
GroupNorm's written-out statistics, attention with a head dimension below MIN_REDUCED_HEAD_DIM,
the sampler update and per-sample renormalization (the step's input latent is FP32), the softmax
and so the argmax; the image latent is kept in FP32 between stages. The caller gets float32
probabilities. Autocast runs without its weight-cast cache: a cast cached in a warm-up run and
reused by the recording would leave the graph reading a tensor freed after capture. The capture
records under the same autocast (every stage sets it). Whether a reduced precision is good enough
for a model is the declaration's accuracy gate (gate.py), not this class's business.

Pre/post-processing (`volume_ops()`, volume.py): torch ops on the model's device, the CPU included,
unless `device_volume=False` (then the run path's scipy reference). With them, `sample(resident=True)`
keeps the K samples' mean, votes and maps on the device for them (samples.py).

`compile=True` (or LDSEG_TORCH_COMPILE=1) wraps the image encoder, the denoiser step and the decoder
in torch.compile on CUDA (compile.py); on CPU it is ignored, and where compiling fails the stage runs
eagerly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ldseg.model.network import LDSeg
from ldseg.model.rewrites import is_lean, make_lean
from ldseg.runtime.backend import Backend, CaptureFailed, PipelineInputs
from ldseg.runtime.backends.torch.compile import Compiled, compile_wanted
from ldseg.runtime.backends.torch.samples import TorchSamples
from ldseg.runtime.backends.torch.volume import TorchVolumeOps

# What the torch backend computes in: the autocast type (None: plain FP32).
AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TorchPlan:
    """Static buffers of one (batch, steps); outputs are (re)assigned by decode."""

    image: torch.Tensor
    z_init: torch.Tensor
    noise: torch.Tensor
    table: torch.Tensor
    z_image: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    labels: torch.Tensor | None = None


# Per sample, an upper estimate: before issue 26, `--samples 8` on knee3d (4.0 M voxels) peaked at
# 22.9 GB on torch CPU with encoder and decoder at batch 8, ~700 B per voxel per sample.
DECODER_BYTES_PER_VOXEL = 1024


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    probabilities: torch.Tensor | None  # the graph's own output tensors, when it decodes
    labels: torch.Tensor | None


class TorchBackend(Backend[TorchPlan, torch.Tensor]):
    name = "torch"

    def __init__(
        self,
        model: LDSeg,
        device: str = "cpu",
        cuda_graph: bool | None = None,
        threads: int | None = None,
        precision: str = "fp32",
        compile: bool | None = None,
        device_volume: bool = True,
        lean: bool = False,
    ):
        """lean: run the model's lean form (ldseg.model.rewrites: the exported graphs' rewrites,
        the same function up to float rounding, 30 % fewer decoder multiply-adds on knee3d) on a
        copy of its own, as `ldseg-run` and the API do; False: the official form, the FP32
        reference (a model that is lean already stays lean).

        device_volume: pre/post-processing with torch ops on the model's device (ldseg/runtime/
        volume_ops.py), the default on CUDA and on the CPU too, where they are bit-equal to the scipy
        path on the knee cases and faster (1.6-2.6x to the model grid, 3.4-3.6x back on 2 Zen 1
        cores: benchmarks/results/amd-epyc-zen1-2c-2026-12-05/volume-ops-cpu); False: the scipy path.
        They run in float64 whatever `precision` is."""
        if precision not in AUTOCAST:
            raise ValueError(f"precision {precision!r}: the torch backend runs {', '.join(AUTOCAST)}")
        if threads is not None:
            torch.set_num_threads(threads)  # torch's intra-op pool is per process
        target = _torch_device(device)
        super().__init__(
            model.cfg,
            f"model {model.cfg.preset!r}",
            cuda_graph=target.type == "cuda" if cuda_graph is None else cuda_graph,
        )
        self.model = _on_device(model, target)
        if lean and not is_lean(self.model):
            if self.model is model:  # the rewrite changes weights: never the caller's module
                self.model = _copy(model)
            make_lean(self.model)
        self.form = "lean" if is_lean(self.model) else "official"  # a lean model handed over stays lean
        self.device = str(target)  # "cpu" or "cuda:N"
        self.precision = precision
        self._autocast_dtype = AUTOCAST[precision]
        self.gate: str | None = None  # the accuracy gate's verdict in words, set by whoever ran it (gate.py)
        self._plans: dict[tuple[int, int], TorchPlan] = {}
        self._volume_ops = TorchVolumeOps(self.device) if device_volume else None
        on_cuda = target.type == "cuda"
        wanted = compile_wanted(compile)
        self._encode = Compiled("encoder", self.model.encode_image, wanted and on_cuda)
        self._denoise = Compiled("denoiser", self.model.step, wanted and on_cuda)
        self._decode = Compiled("decoder", self.model.label_decoder, wanted and on_cuda)
        self._compile_note = "off" if not wanted else "" if on_cuda else "off (CUDA only)"

    def describe(self) -> dict[str, str]:
        described = {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "mode": self.mode,
            "form": self.form,
            "tf32": "off",
            "compile": self._compile_state(),
            "volume_ops": self.volume_ops_words(None if self._volume_ops is None else f"torch ops on {self.device}"),
        }
        if self.gate is not None:
            described["gate"] = self.gate
        return described

    @property
    def _stages(self) -> tuple[Compiled, Compiled, Compiled]:
        return self._encode, self._denoise, self._decode

    @property
    def compiled(self) -> bool:
        """Whether the stages run torch.compiled: asked for, on CUDA, and none fell back to eager."""
        return any(c.enabled for c in self._stages) and all(c.failed is None for c in self._stages)

    def _compile_state(self) -> str:
        stages = self._stages
        return "; ".join(c.state() for c in stages) if any(c.enabled for c in stages) else self._compile_note

    @contextmanager
    def numerics(self) -> Iterator[None]:
        """TF32 off, and autocast to the reduced type where one is asked for (every stage, and the capture)."""
        with strict_fp32():
            if self._autocast_dtype is None:
                yield
                return
            device_type = torch.device(self.device).type
            with torch.autocast(device_type, dtype=self._autocast_dtype, cache_enabled=False):
                yield

    def device_volume_ops(self) -> TorchVolumeOps | None:
        return self._volume_ops

    # ------------------------------------------------------------------ stages
    def plan(self, batch: int, steps: int) -> TorchPlan:
        key = (batch, steps)
        if key not in self._plans:
            cfg, dev = self.config, torch.device(self.device)
            self._plans[key] = TorchPlan(
                image=torch.empty((batch, *cfg.image_shape), device=dev),
                z_init=torch.empty((batch, *cfg.latent_shape), device=dev),
                noise=torch.empty((steps, batch, *cfg.latent_shape), device=dev),
                table=torch.empty((steps, 4), device=dev),
            )
        return self._plans[key]

    def copy_image(self, plan: TorchPlan, image: np.ndarray) -> None:
        plan.image.copy_(torch.from_numpy(image))

    def copy_latents(self, plan: TorchPlan, inputs: PipelineInputs) -> torch.Tensor:
        for target, source in ((plan.z_init, inputs.z_init), (plan.noise, inputs.noise), (plan.table, inputs.table)):
            target.copy_(torch.from_numpy(source))
        return plan.z_init

    def broadcast(self, src: TorchPlan, dst: TorchPlan) -> None:
        if src is not dst:
            assert src.z_image is not None
            dst.z_image = src.z_image.expand(dst.z_init.shape[0], *src.z_image.shape[1:]).contiguous()

    def take(self, src: TorchPlan, z: torch.Tensor, start: int, dst: TorchPlan) -> torch.Tensor:
        return z[start : start + dst.z_init.shape[0]]

    def device_samples(self, samples: int) -> TorchSamples | None:
        """K samples kept on the device where TorchVolumeOps resamples them (samples.py)."""
        if self.volume_ops() is None or self._volume_ops is None:
            return None
        return TorchSamples(samples, self.config.image_size, torch.device(self.device), self._volume_ops.stream)

    def decode_chunk(self, samples: int) -> int:
        if not self.device.startswith("cuda"):
            return 1
        free, _ = torch.cuda.mem_get_info(self.device)
        per_sample = DECODER_BYTES_PER_VOXEL * int(np.prod(self.config.image_size))
        return max(1, min(samples, int(0.5 * free) // per_sample))

    @torch.no_grad()
    def encode(self, plan: TorchPlan) -> None:
        with self.numerics():
            plan.z_image = self._encode(plan.image).float()  # FP32 between stages (a no-op in FP32)

    @torch.no_grad()
    def step(self, plan: TorchPlan, z: torch.Tensor, i: int) -> torch.Tensor:
        assert plan.z_image is not None
        with self.numerics():
            return self._denoise(z, plan.z_image, plan.table[i].expand(z.shape[0], 4), plan.noise[i])

    @torch.no_grad()
    def decode(self, plan: TorchPlan, z: torch.Tensor, probabilities: bool) -> None:
        with self.numerics():
            plan.probabilities = self._decode(z)  # float32: the decoder's softmax is an FP32 island
        plan.labels = plan.probabilities.argmax(dim=1).to(torch.uint8)

    def copy_out(self, plan: TorchPlan, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        assert plan.labels is not None and plan.probabilities is not None
        probs = plan.probabilities.cpu().numpy() if probabilities else None
        return plan.labels.cpu().numpy(), probs

    # ------------------------------------------------------------------ CUDA graphs
    def capture(self, plan: TorchPlan, body: Callable[[], None]) -> _Captured:
        with self.numerics():  # the stages set it too; this covers everything the capture records
            return self._capture(plan, body)

    def _capture(self, plan: TorchPlan, body: Callable[[], None]) -> _Captured:
        plan.probabilities = plan.labels = None  # set again only by a body that decodes
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, cuDNN autotune
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                body()
        except RuntimeError as exc:
            raise CaptureFailed(str(exc)) from exc
        return _Captured(graph, plan.probabilities, plan.labels)  # outputs only used when the body decodes

    def replay(self, plan: TorchPlan, graph: _Captured) -> None:
        graph.graph.replay()
        if graph.probabilities is not None:
            plan.probabilities, plan.labels = graph.probabilities, graph.labels  # this graph's static outputs

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


@contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside, the caller's settings restored after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def _torch_device(device: str) -> torch.device:
    """'cuda' means GPU 0, as for the other backends (parameters report cuda:0, never bare cuda)."""
    target = torch.device(device)
    return torch.device("cuda", 0) if target.type == "cuda" and target.index is None else target


def _on_device(model: LDSeg, device: torch.device) -> LDSeg:
    """The model in eval mode on `device`, without touching the caller's module: a copy whenever
    moving it or switching its mode would change it (a shared model may be exported afterwards)."""
    on_device = all(p.device == device for p in model.parameters())
    if on_device and not model.training:
        return model
    return _copy(model).to(device)


def _copy(model: LDSeg) -> LDSeg:
    """A copy of `model` in eval mode, with its provenance."""
    copied = copy.deepcopy(model).eval()
    copied.trained, copied.checkpoint_hash = dict(model.trained), model.checkpoint_hash
    return copied


def torch_cuda_problem(index: int = 0) -> str | None:
    """Why PyTorch cannot run on GPU `index` (None: it can)."""
    import torch

    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build (the GPU route needs a CUDA build)"
    try:
        torch.cuda.init()  # raises with the driver's own words (no driver, driver too old...)
    except (RuntimeError, AssertionError) as exc:
        return f"PyTorch cannot initialize CUDA: {str(exc).strip().splitlines()[0]}"
    count = torch.cuda.device_count()
    if index >= count:
        return f"GPU {index} requested, PyTorch sees {count} GPU(s) (CUDA_VISIBLE_DEVICES?)"
    return None
