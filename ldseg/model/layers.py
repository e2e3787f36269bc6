"""Dimension-generic building blocks with Keras numerics.

Everything is channels-first (B, C, *spatial). Keras conventions reproduced here (see
../shared/data/README.md): epsilon 1e-3 for every normalization, and TensorFlow's 'same' padding,
which pads asymmetrically (extra voxel after) for stride 2 or an even kernel.

Submodules are registered in the order the official Keras code creates its layers: the weight
importer (ldseg/model/keras_import.py) maps layers kind by kind in that order.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

KERAS_EPS = 1e-3
# Attention with a smaller head dimension runs in FP32 under reduced precision (the rule and its
# measurement: ldseg/export/fp16.py, MIN_FP16_HEAD_DIM).
MIN_REDUCED_HEAD_DIM = 4

Undo = Callable[[], None]  # restores what a rewrite (fold_batchnorm, ...) changed


def reduced(x: torch.Tensor) -> bool:
    """x is in a reduced floating type (torch autocast; the ONNX export traces FP32 only, so a
    branch on this adds nothing to an exported graph)."""
    return x.dtype in (torch.bfloat16, torch.float16)


def conv_cls(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def swish(x: torch.Tensor) -> torch.Tensor:
    """Keras swish, x * sigmoid(x), as PyTorch's one fused kernel (the two-op form launches two and
    makes three more passes over a full-resolution tensor; equal to it within 3 ulp). Exported
    graphs get Sigmoid and Mul either way."""
    return F.silu(x)


class SameConv(nn.Module):
    """Conv with TensorFlow 'same' padding (or 'valid' for 1x1)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        symmetric = stride == 1 and kernel % 2 == 1
        self.conv = conv_cls(dims)(
            cin, cout, kernel, stride=stride, padding=kernel // 2 if symmetric else 0, groups=groups
        )
        self.explicit_pad = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad:
            pads: list[int] = []
            for size in reversed(x.shape[2:]):  # F.pad wants last axis first
                total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return self.conv(x)


class SameConvTranspose(nn.Module):
    """Keras Conv{2,3}DTranspose(kernel 3, stride 2, 'same'): a full transpose conv cropped at the end."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 2):
        super().__init__()
        cls = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        self.conv = cls(cin, cout, kernel, stride=stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        target = [s * self.stride for s in x.shape[2:]]
        index = tuple(slice(0, t) for t in target)
        return out[(Ellipsis, *index)]


class BatchNorm(nn.Module):
    """Inference-time Keras BatchNormalization over the channel axis (eps 1e-3)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, eps=KERAS_EPS, momentum=0.01)
        self.folded = False  # set by folded_batchnorm: the conv before it carries the affine map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return x
        shape = x.shape
        return self.bn(x.reshape(shape[0], shape[1], -1)).reshape(shape)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference scale and shift per channel: forward(x) == x * scale + shift."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale


ConvBN = tuple[SameConv, BatchNorm]  # a conv and the BatchNorm reading its output


def fold_batchnorm(model: nn.Module) -> tuple[int, Undo]:
    """Every inference BatchNorm that directly follows a conv (the pairs modules list in
    `conv_bn_pairs()`) folded into that conv's weights and bias, the BatchNorm then the identity;
    pairs folded already are left. How many were folded, and how to restore their weights."""
    pairs: list[ConvBN] = []
    for module in model.modules():
        listed = getattr(module, "conv_bn_pairs", None)
        if listed is not None:
            pairs += [(conv, bn) for conv, bn in listed() if not bn.folded]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def undo() -> None:
        with torch.no_grad():
            for (conv, bn), (weight, bias) in zip(pairs, saved):
                conv.conv.weight.copy_(weight)
                assert conv.conv.bias is not None
                conv.conv.bias.copy_(bias)
                bn.folded = False

    try:
        with torch.no_grad():
            for conv, bn in pairs:
                c = conv.conv
                assert c.bias is not None  # Keras convs carry a bias (use_bias=True)
                saved.append((c.weight.detach().clone(), c.bias.detach().clone()))
                scale, shift = bn.affine()
                c.weight.mul_(scale.reshape(-1, *[1] * (c.weight.dim() - 1)))
                c.bias.mul_(scale).add_(shift)
                bn.folded = True
    except BaseException:  # no half-folded model: what was folded is restored
        undo()
        raise
    return len(pairs), undo


@contextlib.contextmanager
def folded_batchnorm(model: nn.Module) -> Iterator[int]:
    """`fold_batchnorm` inside the block, the weights restored on exit; yields how many. Exported
    graphs get no BatchNormalization node: in an FP16 bundle an FP32 BatchNorm would need a cast
    pair around it at every full-resolution layer and would block TensorRT's conv fusions."""
    count, undo = fold_batchnorm(model)
    try:
        yield count
    finally:
        undo()


class GroupNorm(nn.Module):
    """Keras GroupNormalization (eps 1e-3), written out as mean/var so ONNX and TensorRT get plain
    reductions instead of GroupNormalization (see ../shared/docs/tensorrt.md, #4336/#4756).

    Each statistic is a mean of row means over (C/G * first spatial axis, rest of the grid): ONNX
    Runtime sums one reduction sequentially per output, so a single ReduceMean over a knee3d group
    (4.2M voxels) is off by 2.4e-4 of the output, two levels by 2.8e-7 (float64 statistics as the
    reference; PyTorch 1.8e-7) at the same speed. The opset-21 GroupNormalization (3.0e-4) and
    InstanceNormalization (2.4e-4) are as inaccurate there. The variance stays centered (two passes).

    `fused` (the denoiser's, set by Denoiser): PyTorch's group_norm at inference too, which the
    exporter writes as Reshape, InstanceNormalization, Reshape, Mul, Add: 5 nodes for the 14 above,
    one kernel in torch. The denoiser's groups are latent-sized (knee3d: at most 16K values), where
    one sequential sum is as exact as two levels, and its 15-step loop is launch-bound (issue 31).
    """

    def __init__(self, groups: int, channels: int):
        super().__init__()
        self.groups = groups
        self.fused = False
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # Training: PyTorch's fused kernel, forward and backward (the written-out form costs a
            # knee denoiser step ~25 % in elementwise ops and their gradients on CPU). Same
            # statistics up to float rounding; inference and export keep the form above (unless fused).
            return self._fused(x)
        if reduced(x):  # autocast: the statistics would be BF16/FP16 reductions; FP32 island
            with torch.autocast(x.device.type, enabled=False):
                return self._inference(x.float()).to(x.dtype)
        return self._inference(x)

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused(x) if self.fused else self._normalize(x)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.weight, self.bias, KERAS_EPS)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        g = x.reshape(shape[0], self.groups, (shape[1] // self.groups) * shape[2], -1)
        mean = g.mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)
        centered = g - mean
        var = centered.pow(2).mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)
        g = centered * torch.rsqrt(var + KERAS_EPS)
        affine_shape = (1, shape[1]) + (1,) * (len(shape) - 2)
        return g.reshape(shape) * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)


class ResConvBlock(nn.Module):
    """Official `res_conv_block` with batch norm: conv-BN-swish-conv-BN (+ 1x1 conv-BN shortcut), swish."""

    def __init__(self, dims: int, cin: int, cout: int):
        super().__init__()
        self.conv1 = SameConv(dims, cin, cout, 3)
        self.bn1 = BatchNorm(cout)
        self.conv2 = SameConv(dims, cout, cout, 3)
        self.shortcut = SameConv(dims, cin, cout, 1)
        self.bn2 = BatchNorm(cout)
        self.bn_shortcut = BatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(swish(self.bn1(self.conv1(x)))))
        return swish(self.bn_shortcut(self.shortcut(x)) + y)

    def conv_bn_pairs(self) -> list[ConvBN]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.shortcut, self.bn_shortcut)]


# Nearest x2 upsampling then a 3-tap conv, seen from one output parity along one axis: the even
# output 2m reads x[m-1] with w0 and x[m] with w1 + w2; the odd output 2m+1 reads x[m] with w0 + w1
# and x[m+1] with w2. Rows: the two taps of a 2-tap kernel; columns: the original taps.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 'same' conv (official `UpSample`).

    `phase_form = True` computes the same function without the upsampled intermediate: each of the
    2^d output parities is a 2-tap-per-axis conv of the low-resolution input with summed weights, so
    one conv with 2^d * cout channels (padding 1) plus an interleave replaces the full-resolution
    3x3 conv: 8/27 of the multiply-adds in 3D, 4/9 in 2D. The weights (and checkpoints) stay the
    official ones; `phase_upsampling` derives the phase kernel from them once, and an exported graph
    holds it as a constant. Exact up to float rounding (tests/model/test_layers.py). The exported
    graphs and the torch backend's lean form use it (ldseg.model.rewrites).

    The interleave is one reshape-transpose-reshape of the whole conv output (N + 1 per axis) and one
    crop, not a slice per parity and axis: parity p's output row n is the conv's row n + p, which is
    row 2n + 1 + p of the conv output interleaved with its phases in reverse order (q = 1 - p), so
    the crop drops that interleave's first and last row. Knee3d denoiser: 2 x 42 nodes -> 2 x 7.
    """

    def __init__(self, dims: int, cin: int, cout: int):
        super().__init__()
        self.conv = SameConv(dims, cin, cout, 3)
        self.phase_form = False
        # Set by phase_upsampling: the derived kernel as a plain constant, so an exported graph
        # holds it as an initializer (a conv whose weights are computed in-graph is slow or
        # unsupported in some TensorRT configurations).
        self.frozen_phase: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase_form:
            return self._phase_forward(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def phase_kernel(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(2^d * cout, cin, 2, ..., 2) weights and repeated bias of the phase-form conv, the parities
        in reverse order: block q (q_1..q_d as binary digits) is parity p = 1 - q."""
        conv = self.conv.conv
        weight = conv.weight
        dims = weight.dim() - 2
        taps = _PHASE_TAPS.to(weight)
        phases = list(itertools.product((1, 0), repeat=dims))
        kernels = []
        for phase in phases:  # contract each spatial axis of the 3-tap kernel to 2 taps
            k = weight
            for axis, parity in enumerate(phase):
                k = torch.tensordot(k, taps[parity], dims=([2 + axis], [1])).movedim(-1, 2 + axis)
            kernels.append(k)
        bias = conv.bias.repeat(len(phases)) if conv.bias is not None else None
        return torch.cat(kernels), bias

    def _phase_forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.dim() - 2
        batch, sizes = x.shape[0], x.shape[2:]
        cout = self.conv.conv.weight.shape[0]
        weight, bias = self.frozen_phase if self.frozen_phase is not None else self.phase_kernel()
        conv_nd = F.conv3d if dims == 3 else F.conv2d
        grown = [n + 1 for n in sizes]
        y = conv_nd(x, weight, bias, padding=1).reshape(batch, *([2] * dims), cout, *grown)
        # (B, q_1..q_d, C, M_1..M_d) -> (B, C, M_1, q_1, ..., M_d, q_d) -> (B, C, 2 M_1, ..., 2 M_d)
        order = [0, 1 + dims] + [i for axis in range(dims) for i in (2 + dims + axis, 1 + axis)]
        out = y.permute(order).reshape(batch, cout, *(2 * m for m in grown))
        for axis, n in enumerate(sizes):  # output row 2n + p is interleaved row 2n + 1 + p
            out = out.narrow(2 + axis, 1, 2 * n)
        return out


def freeze_phase_upsampling(model: nn.Module) -> tuple[int, Undo]:
    """Every `Upsample` in `model` computes in its phase form from a kernel derived now (so the
    weights must not change after); those frozen already are left. How many, and how to undo it."""
    ups = [m for m in model.modules() if isinstance(m, Upsample) and m.frozen_phase is None]
    before = [m.phase_form for m in ups]
    for m in ups:
        m.phase_form = True
        with torch.no_grad():
            weight, bias = m.phase_kernel()
        m.frozen_phase = (weight.detach(), None if bias is None else bias.detach())

    def undo() -> None:
        for m, flag in zip(ups, before):
            m.phase_form, m.frozen_phase = flag, None

    return len(ups), undo


@contextlib.contextmanager
def phase_upsampling(model: nn.Module) -> Iterator[int]:
    """`freeze_phase_upsampling` inside the block, undone on exit; yields how many."""
    count, undo = freeze_phase_upsampling(model)
    try:
        yield count
    finally:
        undo()


class SelfAttention(nn.Module):
    """Official attention blocks: GroupNorm, Dense q/k/v over channels, softmax over all positions,
    Dense projection. The single-head `AttentionBlock` adds it to the *normalized* input; the 2D
    image encoder's `MultiHeadAttentionBlock` to the raw input (`normalized_residual=False`)."""

    def __init__(self, channels: int, groups: int, heads: int = 1, normalized_residual: bool = True):
        super().__init__()
        self.heads = heads
        self.normalized_residual = normalized_residual
        self.scale = float(channels // heads) ** -0.5
        self.norm = GroupNorm(groups, channels)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        # Set by fused_attention (exports): q, k, v as one (3C, C) matrix and bias, the softmax scale
        # folded into q's rows, held as plain constants so a graph holds them as initializers.
        self.frozen_qkv: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reduced(x) and self.query.in_features // self.heads < MIN_REDUCED_HEAD_DIM:
            with torch.autocast(x.device.type, enabled=False):  # FP32 island (see MIN_REDUCED_HEAD_DIM)
                return self._attend(x.float()).to(x.dtype)
        return self._attend(x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        normed = self.norm(x)
        tokens = normed.reshape(shape[0], shape[1], -1).transpose(1, 2)  # (B, N, C)
        b, n, c = tokens.shape
        if self.frozen_qkv is not None:  # one MatMul, Add and Split instead of three of each and a Mul
            q, k, v = F.linear(tokens, *self.frozen_qkv).split(c, dim=-1)
            scale = 1.0
        else:
            q, k, v = (layer(tokens) for layer in (self.query, self.key, self.value))
            scale = self.scale
        fused = q.is_cuda and not torch.compiler.is_exporting()
        # A head axis where there are heads, or for SDPA's fused kernels ((B, heads, N, d)); one head
        # without them needs none: an exported denoiser block has 8 reshapes and transposes fewer.
        split = self.heads > 1 or fused
        if split:
            q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        if fused:
            # One fused kernel instead of matmul, scale, softmax, matmul (issue 31); exports trace the
            # written-out form, which ONNX Runtime and TensorRT fuse themselves.
            attended = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            logits = torch.matmul(q, k.transpose(-1, -2))
            attended = torch.matmul(torch.softmax(logits * scale if scale != 1.0 else logits, dim=-1), v)
        out = attended.transpose(1, 2).reshape(b, n, c) if split else attended
        out = self.proj(out).transpose(1, 2).reshape(shape)
        return (normed if self.normalized_residual else x) + out


def fuse_attention(model: nn.Module) -> tuple[int, Undo]:
    """Every `SelfAttention` in `model` computes q, k and v with one matrix (the softmax scale folded
    into q's weights and bias), derived now; blocks fused already are left. How many, and the undo."""
    blocks = [m for m in model.modules() if isinstance(m, SelfAttention) and m.frozen_qkv is None]
    for m in blocks:
        with torch.no_grad():  # plain constants, outside autograd
            weight = torch.cat([m.query.weight * m.scale, m.key.weight, m.value.weight])
            bias = torch.cat([m.query.bias * m.scale, m.key.bias, m.value.bias])
        m.frozen_qkv = (weight, bias)

    def undo() -> None:
        for m in blocks:
            m.frozen_qkv = None

    return len(blocks), undo


@contextlib.contextmanager
def fused_attention(model: nn.Module) -> Iterator[int]:
    """`fuse_attention` inside the block, undone on exit; yields how many. The same function up to
    float rounding (tests/model/test_layers.py); exported graphs use it."""
    count, undo = fuse_attention(model)
    try:
        yield count
    finally:
        undo()


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of a (possibly fractional) timestep, then the official two-layer MLP."""

    freqs: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)
        self.dense1 = nn.Linear(dim, dim)
        self.dense2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float32:  # integer timesteps in training; no cast node in exported graphs
            t = t.float()
        emb = t[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        return self.dense2(swish(self.dense1(emb)))


class TimeResBlock(nn.Module):
    """Official denoiser `ResidualBlock`: GN-swish-conv, + Dense(swish(temb)), GN-swish-conv, + residual.

    `forward` takes swish(temb), which is the same for every block of a step: the Denoiser computes
    it once (two kernels a block fewer in the launch-bound step; exported graphs already shared it).
    """

    def __init__(self, dims: int, cin: int, cout: int, groups: int, temb_dim: int):
        super().__init__()
        self.residual: SameConv | None = SameConv(dims, cin, cout, 1) if cin != cout else None
        self.temb = nn.Linear(temb_dim, cout)
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = SameConv(dims, cin, cout, 3)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = SameConv(dims, cout, cout, 3)
        self.dims = dims

    def forward(self, x: torch.Tensor, temb_swish: torch.Tensor) -> torch.Tensor:
        residual = x if self.residual is None else self.residual(x)
        t = self.temb(temb_swish).reshape(temb_swish.shape[0], -1, *([1] * self.dims))
        h = self.conv1(swish(self.norm1(x))) + t
        h = self.conv2(swish(self.norm2(h)))
        return h + residual
