"""Model configuration: one frozen dataclass, presets as data.

The official release has a 3D (knee) and a 2D (GlaS) variant that differ in a handful of
architectural choices; each choice is a field here, so one implementation builds both.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ldseg.errors import ArtifactError

Schedule = Literal["cosine", "linear", "quadratic"]
Sampler = Literal["ddim", "ddpm"]
# ModelConfig fields that describe sampling or presentation, not the network's architecture.
NON_ARCHITECTURE = frozenset({"diffusion", "class_names", "class_colors"})
# Class 0 (background) black, then a colour-blind-safe palette (Okabe-Ito).
DEFAULT_COLORS = ("#000000", "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: Schedule = "cosine"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: Sampler = "ddim"
    steps: int = 15


@dataclass(frozen=True)
class ModelConfig:
    preset: str
    spatial_dims: int  # 2 or 3
    image_channels: int
    image_size: tuple[int, ...]  # model grid, (D, H, W) or (H, W)
    num_classes: int
    # label autoencoder
    filters: int = 16
    encoder_levels: tuple[int, ...] = (1, 2, 4, 4, 2)  # width multipliers; len-1 downsamplings
    decoder_levels: tuple[int, ...] = (2, 4, 4, 2)  # width multipliers; one upsampling each
    encoder_downsample: Literal["conv", "maxpool"] = "conv"
    encoder_out_kernel: int = 2
    decoder_upsample: Literal["nearest_conv", "transpose"] = "nearest_conv"
    # image encoder
    image_levels: tuple[int, ...] = (2, 4, 4, 2)
    image_block_groups: int = 4  # grouped convs (3D) / GroupNorm groups
    image_grouped_conv: bool = True  # 3D: grouped convs + max-pool; 2D: plain convs + strided conv
    image_attention: tuple[bool, ...] = (False, False, False, False)  # MHA after each block (2D)
    image_final_attention: bool = False  # 2D: 1-channel MHA + swish before the final BN
    # denoiser
    denoiser_first_channels: int = 16
    denoiser_widths: tuple[int, ...] = (16, 32, 64)
    denoiser_attention: tuple[bool, ...] = (False, True, True)
    denoiser_res_blocks: int = 2
    denoiser_groups: int = 4
    denoiser_skip_all: bool = False  # 2D variant: also skips the stem and each downsample
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # What each class is, for clinical outputs (DICOM SEG segment labels and display colours).
    # Empty: generic names/colours (checkpoints written before these fields existed load that way).
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()  # "#rrggbb", one per class

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, index = class id (0 is background); generic where none fit num_classes
        (a preset changed in code with dataclasses.replace; loaded configs are checked in from_dict)."""
        if len(self.class_names) == self.num_classes:
            return self.class_names
        return ("background", *(f"class {c}" for c in range(1, self.num_classes)))

    @property
    def colors(self) -> tuple[str, ...]:
        """Display colours "#rrggbb", index = class id."""
        if len(self.class_colors) == self.num_classes:
            return self.class_colors
        return tuple(DEFAULT_COLORS[c % len(DEFAULT_COLORS)] for c in range(self.num_classes))

    def class_problem(self) -> str | None:
        """Why class_names/class_colors do not describe this config's classes, or None."""
        for what, values in (("class_names", self.class_names), ("class_colors", self.class_colors)):
            if values and len(values) != self.num_classes:
                return f"{what} has {len(values)} entries for {self.num_classes} classes"
        for color in self.class_colors:
            if not re.fullmatch(r"#[0-9a-fA-F]{6}", color):
                return f"class colour {color!r} is not of the form #rrggbb"
        return None

    @property
    def latent_size(self) -> tuple[int, ...]:
        factor = 2 ** (len(self.encoder_levels) - 1)
        return tuple(s // factor for s in self.image_size)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.image_channels, *self.image_size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, *self.latent_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelConfig:
        try:
            data = dict(data)
            diffusion = DiffusionConfig(**data.pop("diffusion", {}))
            tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
            cfg = ModelConfig(**{**data, **tuples, "diffusion": diffusion})
        except TypeError as exc:
            raise ArtifactError(f"model config is not one ldseg understands: {exc}") from exc
        preset = PRESETS.get(cfg.preset)
        if "class_names" not in data and preset is not None and preset.num_classes == cfg.num_classes:
            # written before class names existed: the preset's names and colours describe it
            cfg = dataclasses.replace(cfg, class_names=preset.class_names, class_colors=preset.class_colors)
        problem = cfg.class_problem()
        if problem is not None:
            raise ArtifactError(f"model config: {problem}")
        return cfg

    def with_diffusion(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, diffusion=dataclasses.replace(self.diffusion, **changes))


PRESETS: dict[str, ModelConfig] = {
    # Official knee MRI model (LDSeg3D.py / utilities/model3D.py).
    # Classes 1 / 2 are the femur and tibia sides of the joint (../shared/data/README.md; each
    # covers ~0.63 L in a case, so bone with its cartilage rather than cartilage alone).
    "knee3d": ModelConfig(
        preset="knee3d",
        spatial_dims=3,
        image_channels=1,
        image_size=(128, 128, 256),
        num_classes=3,
        class_names=("background", "femur", "tibia"),
        class_colors=("#000000", "#e69f00", "#56b4e9"),
    ),
    # Official GlaS histology model (LDSeg.py / utilities/model.py).
    "glas2d": ModelConfig(
        preset="glas2d",
        spatial_dims=2,
        image_channels=3,
        image_size=(512, 512),
        num_classes=2,
        encoder_downsample="maxpool",
        encoder_out_kernel=1,
        decoder_upsample="transpose",
        image_grouped_conv=False,
        image_attention=(False, False, True, True),
        image_final_attention=True,
        denoiser_skip_all=True,
        class_names=("background", "gland"),
        class_colors=("#000000", "#cc79a7"),
    ),
    # Small 3D model of the same family, trained on phantoms and shipped in the package.
    "demo": ModelConfig(
        preset="demo",
        spatial_dims=3,
        image_channels=1,
        image_size=(32, 64, 64),
        num_classes=3,
        filters=8,
        encoder_levels=(1, 2, 2, 2),
        decoder_levels=(2, 2, 2),
        image_levels=(2, 2, 2),
        image_block_groups=4,
        denoiser_first_channels=16,
        denoiser_widths=(16, 32),
        denoiser_attention=(False, True),
        class_names=("background", "structure 1", "structure 2"),
        class_colors=("#000000", "#e69f00", "#56b4e9"),
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ArtifactError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
