"""What each graph of a bundle is: wrapper module, I/O names and shapes, and example inputs.

As in optimum's OnnxConfig, a spec only says *what* a graph's signature is; `onnx_export.py` says
*how* it is exported and `validate.py` reuses `example_inputs` to compare ONNX with PyTorch. The
first axis of every input and output is the batch, dynamic and named "batch"; every other axis is
static (the model grid is fixed per preset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ldseg.model.components import Denoiser, ImageEncoder, LabelDecoder
from ldseg.model.config import ModelConfig
from ldseg.model.diffusion import renormalize, sampler_step, sampler_table, table_tensor
from ldseg.model.network import LDSeg, minmax

BATCH_AXIS = "batch"
Shape = tuple[int | str, ...]


class EncoderGraph(nn.Module):
    """Raw image on the model grid -> image latent; the per-sample min-max is part of the graph."""

    def __init__(self, net: ImageEncoder):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(minmax(image))


class DenoiseStepGraph(nn.Module):
    """One fused sampler step (denoiser + update + per-sample renormalization): LDSeg.step."""

    def __init__(self, model: LDSeg):
        super().__init__()
        self.step = model.step

    def forward(
        self, z: torch.Tensor, z_image: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        return self.step(z, z_image, coeffs, noise)


class StepUpdateGraph(nn.Module):
    """The sampler update of one step alone (no weights): denoise_step is the denoiser graph followed
    by this one (ldseg.export.compose), so the denoiser is traced once."""

    def forward(self, z: torch.Tensor, eps: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return sampler_step(z, eps, noise, coeffs)


class DenoiserGraph(nn.Module):
    """The raw denoiser, for users who bring their own sampler."""

    def __init__(self, net: Denoiser):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor, z_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(z, z_image, t)


class DecoderGraph(nn.Module):
    def __init__(self, net: LabelDecoder):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DecoderArgmaxGraph(nn.Module):
    """Latent -> uint8 label map. Argmax of the probabilities, exactly as TorchBackend does it, so
    ties resolve the same way; the softmax is negligible next to the full-resolution convs."""

    def __init__(self, net: LabelDecoder):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).argmax(dim=1).to(torch.uint8)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Shape  # BATCH_AXIS first
    dtype: str  # numpy dtype name


# (config, batch, generator) -> example inputs in input order.
InputMaker = Callable[[ModelConfig, int, torch.Generator], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem and manifest key
    build: Callable[[LDSeg], nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example_inputs: InputMaker
    # Modules whose nodes the FP16 pass may lower (minus normalizations, see fp16.py); everything
    # the wrapper adds around them (min-max, the sampler update, argmax) stays FP32.
    fp16_body: tuple[type[nn.Module], ...]
    # Built from this other graph of the bundle (ldseg.export.compose) rather than traced; what
    # `build` returns is still the PyTorch reference it is validated against.
    derived_from: str | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _latent(cfg: ModelConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    return renormalize(torch.randn((batch, *cfg.latent_shape), generator=gen))


def _table_rows(cfg: ModelConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Real sampler coefficients (random rows of the default table), so checks cover real t/a/b/c."""
    table = table_tensor(sampler_table(cfg.diffusion))
    return table[torch.randint(0, table.shape[0], (batch,), generator=gen)]


def _image(cfg: ModelConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    # Raw scanner-like intensities (offset and scale per sample): min-max must happen in the graph.
    base = torch.rand((batch, *cfg.image_shape), generator=gen)
    scale = 50.0 + 1000.0 * torch.rand((batch,) + (1,) * len(cfg.image_shape), generator=gen)
    offset = -300.0 + 600.0 * torch.rand((batch,) + (1,) * len(cfg.image_shape), generator=gen)
    return offset + scale * base


def _step_inputs(cfg: ModelConfig, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return _latent(cfg, batch, gen), _latent(cfg, batch, gen), _table_rows(cfg, batch, gen), _latent(cfg, batch, gen)


def _denoiser_inputs(cfg: ModelConfig, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return _latent(cfg, batch, gen), _latent(cfg, batch, gen), _table_rows(cfg, batch, gen)[:, 0].contiguous()


def graph_specs(cfg: ModelConfig) -> dict[str, GraphSpec]:
    """The bundle's graphs for one model configuration, in export order."""
    b: int | str = BATCH_AXIS
    image = TensorSpec("image", (b, *cfg.image_shape), "float32")
    latent: Shape = (b, *cfg.latent_shape)
    z, z_image = TensorSpec("z", latent, "float32"), TensorSpec("z_image", latent, "float32")
    specs = [
        GraphSpec(
            "encoder",
            lambda m: EncoderGraph(m.image_encoder),
            (image,),
            (z_image,),
            lambda c, n, g: (_image(c, n, g),),
            (ImageEncoder,),
        ),
        GraphSpec(
            "denoise_step",
            DenoiseStepGraph,
            (z, z_image, TensorSpec("coeffs", (b, 4), "float32"), TensorSpec("noise", latent, "float32")),
            (TensorSpec("z_next", latent, "float32"),),
            _step_inputs,
            (Denoiser,),
            derived_from="denoiser",
        ),
        GraphSpec(
            "denoiser",
            lambda m: DenoiserGraph(m.denoiser),
            (z, z_image, TensorSpec("t", (b,), "float32")),
            (TensorSpec("eps", latent, "float32"),),
            _denoiser_inputs,
            (Denoiser,),
        ),
        GraphSpec(
            "decoder",
            lambda m: DecoderGraph(m.label_decoder),
            (z,),
            (TensorSpec("probabilities", (b, cfg.num_classes, *cfg.image_size), "float32"),),
            lambda c, n, g: (_latent(c, n, g),),
            (LabelDecoder,),
        ),
        GraphSpec(
            "decoder_argmax",
            lambda m: DecoderArgmaxGraph(m.label_decoder),
            (z,),
            (TensorSpec("labels", (b, *cfg.image_size), "uint8"),),
            lambda c, n, g: (_latent(c, n, g),),
            (LabelDecoder,),
            derived_from="decoder",
        ),
    ]
    return {s.name: s for s in specs}


def update_spec(cfg: ModelConfig) -> GraphSpec:
    """The step's update as a graph of its own: traced for ldseg.export.compose, never a bundle file."""
    latent: Shape = (BATCH_AXIS, *cfg.latent_shape)

    def inputs(c: ModelConfig, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return _latent(c, n, g), _latent(c, n, g), _table_rows(c, n, g), _latent(c, n, g)

    return GraphSpec(
        "update",
        lambda m: StepUpdateGraph(),
        tuple(
            TensorSpec(name, shape, "float32")
            for name, shape in (("z", latent), ("eps", latent), ("coeffs", (BATCH_AXIS, 4)), ("noise", latent))
        ),
        (TensorSpec("z_next", latent, "float32"),),
        inputs,
        (),
    )
