"""The four LDSeg components, built for 2D or 3D from one ModelConfig.

Each __init__ creates its layers in the order the official Keras code does (see layers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldseg.model.config import ModelConfig
from ldseg.model.layers import (
    BatchNorm,
    ConvBN,
    GroupNorm,
    ResConvBlock,
    SameConv,
    SameConvTranspose,
    SelfAttention,
    TimeEmbedding,
    TimeResBlock,
    Upsample,
    reduced,
    swish,
)


class ElementLayerNorm(nn.Module):
    """Keras LayerNormalization over every non-batch axis with a scale/offset per element."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, tuple(x.shape[1:]), self.weight, self.bias, eps=1e-3)


class LabelEncoder(nn.Module):
    """Label map (B, 1, *grid), class ids as floats -> latent (B, 1, *grid/2^L), layer-normalized."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dims, widths = cfg.spatial_dims, [m * cfg.filters for m in cfg.encoder_levels]
        self.stages = nn.ModuleList()
        cin = 1
        for i, width in enumerate(widths):
            self.stages.append(ResConvBlock(dims, cin, width))
            if i != len(widths) - 1:
                if cfg.encoder_downsample == "conv":
                    self.stages.append(SameConv(dims, width, width, 3, stride=2))
                else:
                    self.stages.append(nn.MaxPool3d(2) if dims == 3 else nn.MaxPool2d(2))
            cin = width
        self.out_conv = SameConv(dims, cin, 1, cfg.encoder_out_kernel)
        self.norm = ElementLayerNorm(cfg.latent_shape)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        x = label
        for stage in self.stages:
            x = stage(x)
        return self.norm(self.out_conv(x))


class LabelDecoder(nn.Module):
    """Latent -> class probabilities (B, K, *grid), softmax over classes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dims = cfg.spatial_dims
        self.stages = nn.ModuleList()
        cin = 1
        for width in (m * cfg.filters for m in cfg.decoder_levels):
            up: nn.Module = (
                Upsample(dims, cin, width)
                if cfg.decoder_upsample == "nearest_conv"
                else SameConvTranspose(dims, cin, width)
            )
            self.stages.append(up)
            self.stages.append(ResConvBlock(dims, width, width))
            cin = width
        self.out_conv = SameConv(dims, cin, cfg.num_classes, 1)
        self.out_norm = BatchNorm(cfg.num_classes)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for stage in self.stages:
            x = stage(x)
        return self.out_norm(self.out_conv(swish(x)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.logits(z)
        if reduced(logits):  # autocast: probabilities (and the argmax of them) in FP32
            logits = logits.float()
        return torch.softmax(logits, dim=1)

    def conv_bn_pairs(self) -> list[ConvBN]:
        return [(self.out_conv, self.out_norm)]


class ImageBlock(nn.Module):
    """Official image-encoder `conv_block`: 1x1 residual, two 3x3 convs, swish, /2, GroupNorm."""

    def __init__(self, dims: int, cin: int, cout: int, groups: int, grouped: bool):
        super().__init__()
        conv_groups = groups if grouped else 1
        self.residual = SameConv(dims, cin, cout, 1)
        self.conv1 = SameConv(dims, cin, cout, 3, groups=conv_groups)
        self.conv2 = SameConv(dims, cout, cout, 3, groups=conv_groups)
        # 3D halves with max-pooling, 2D with a strided conv.
        self.down: nn.Module = (
            (nn.MaxPool3d(2) if dims == 3 else nn.MaxPool2d(2)) if grouped else SameConv(dims, cout, cout, 3, 2)
        )
        self.norm = GroupNorm(groups, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(swish(self.conv1(swish(x))))
        return self.norm(self.down(swish(h + self.residual(x))))


class ImageEncoder(nn.Module):
    """Image (B, C, *grid) in [0, 1] -> image latent (B, 1, *latent)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dims, f = cfg.spatial_dims, cfg.filters
        self.stem = SameConv(dims, cfg.image_channels, f, 3)
        self.stages = nn.ModuleList()
        cin = f
        for mult, attend in zip(cfg.image_levels, cfg.image_attention):
            width = mult * f
            self.stages.append(ImageBlock(dims, cin, width, cfg.image_block_groups, cfg.image_grouped_conv))
            if attend:  # 2D: Keras MultiHeadAttentionBlock(width), 8 heads, 8 groups
                self.stages.append(SelfAttention(width, groups=8, heads=8, normalized_residual=False))
            cin = width
        # 3D ends in a 3x3 conv; 2D in a 1x1 conv, a 1-channel attention and swish.
        self.out_conv = SameConv(dims, cin, 1, 1 if cfg.image_final_attention else 3)
        self.out_attention = (
            SelfAttention(1, groups=1, heads=1, normalized_residual=False) if cfg.image_final_attention else None
        )
        self.out_norm = BatchNorm(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        for stage in self.stages:
            x = stage(x)
        x = self.out_conv(x)
        if self.out_attention is not None:
            x = swish(self.out_attention(x))
        return self.out_norm(x)

    def conv_bn_pairs(self) -> list[ConvBN]:
        # 2D puts an attention block between the conv and the norm: nothing to fold there.
        return [(self.out_conv, self.out_norm)] if self.out_attention is None else []


class AttendedResBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, groups: int, temb_dim: int, attention: bool):
        super().__init__()
        self.block = TimeResBlock(dims, cin, cout, groups, temb_dim)
        self.attention = SelfAttention(cout, groups) if attention else None

    def forward(self, x: torch.Tensor, temb_swish: torch.Tensor) -> torch.Tensor:
        x = self.block(x, temb_swish)
        return x if self.attention is None else self.attention(x)


class Denoiser(nn.Module):
    """Time-conditioned U-Net: (noisy label latent, image latent, t) -> predicted noise."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dims, groups = cfg.spatial_dims, cfg.denoiser_groups
        widths, attention = cfg.denoiser_widths, cfg.denoiser_attention
        first = cfg.denoiser_first_channels
        temb_dim = first * 4
        self.skip_all = cfg.denoiser_skip_all
        self.stem = SameConv(dims, 2, first, 3)
        self.time = TimeEmbedding(temb_dim)

        self.down = nn.ModuleList()
        channels = first
        skip_channels = [first] if self.skip_all else []
        for i, width in enumerate(widths):
            for _ in range(cfg.denoiser_res_blocks):
                self.down.append(AttendedResBlock(dims, channels, width, groups, temb_dim, attention[i]))
                channels = width
                skip_channels.append(channels)
            if width != widths[-1]:
                self.down.append(SameConv(dims, channels, width, 3, stride=2))
                if self.skip_all:
                    skip_channels.append(width)

        self.middle = nn.ModuleList(
            [
                TimeResBlock(dims, channels, widths[-1], groups, temb_dim),
                SelfAttention(widths[-1], groups),
                TimeResBlock(dims, widths[-1], widths[-1], groups, temb_dim),
            ]
        )
        channels = widths[-1]

        self.up = nn.ModuleList()
        blocks_per_level = cfg.denoiser_res_blocks + (1 if self.skip_all else 0)
        for i in reversed(range(len(widths))):
            for _ in range(blocks_per_level):
                cin = channels + skip_channels.pop()
                self.up.append(AttendedResBlock(dims, cin, widths[i], groups, temb_dim, attention[i]))
                channels = widths[i]
            if i != 0:
                self.up.append(Upsample(dims, channels, widths[i]))
        self.out_norm = GroupNorm(groups, channels)
        self.out_conv = SameConv(dims, channels, 1, 3)
        for module in self.modules():  # latent-sized groups: the fused form (GroupNorm's doc)
            if isinstance(module, GroupNorm):
                module.fused = True

    def forward(self, z_label: torch.Tensor, z_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([z_label, z_image], dim=1))
        temb = swish(self.time(t))  # what every block reads (TimeResBlock), computed once a step
        skips = [x] if self.skip_all else []
        for layer in self.down:
            if isinstance(layer, AttendedResBlock):
                x = layer(x, temb)
                skips.append(x)
            else:
                x = layer(x)
                if self.skip_all:
                    skips.append(x)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, temb)), temb)
        for layer in self.up:
            if isinstance(layer, AttendedResBlock):
                x = layer(torch.cat([x, skips.pop()], dim=1), temb)
            else:
                x = layer(x)
        return self.out_conv(swish(self.out_norm(x)))
