"""The model's lean form: the exported graphs' three rewrites of the same function (layers.py).

Phase-form upsampling (the knee3d decoder: 1,327 -> 922 GFLOP), every BatchNorm folded into the conv
before it, and each attention block's q, k, v as one matrix (fewer kernels in the launch-bound
step). Equal to the official form up to float rounding (tests/model/test_rewrites.py).

Exports run them inside `lean_form` (the checkpoint's weights restored on exit); the torch backend
runs them for good on a copy of its own (`make_lean`). The official form stays the FP32 reference:
export validation, ldseg-bench's reference row and gpu_check's CPU reference run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ldseg.model.layers import (
    BatchNorm,
    SelfAttention,
    Upsample,
    fold_batchnorm,
    freeze_phase_upsampling,
    fuse_attention,
)

# Each rewrite: applied in place, skipping what it rewrote already; returns (count, undo).
LEAN_REWRITES = {
    "phase_upsampling": freeze_phase_upsampling,
    "folded_batchnorm": fold_batchnorm,
    "fused_attention": fuse_attention,
}


@contextlib.contextmanager
def lean_form(model: nn.Module) -> Iterator[dict[str, int]]:
    """`model` (in eval mode: BatchNorm folds its running statistics) in its lean form inside the
    block, restored bit-exact on exit; yields how many modules each rewrite changed."""
    counts: dict[str, int] = {}
    with contextlib.ExitStack() as undo:
        for name, rewrite in LEAN_REWRITES.items():
            counts[name], restore = rewrite(model)
            undo.callback(restore)
        yield counts


def make_lean(model: nn.Module) -> dict[str, int]:
    """Rewrite `model` (eval mode) into its lean form for good; idempotent. Its weights change (the
    BatchNorms are folded): give it a model of its own, never one an exporter or trainer shares."""
    return {name: rewrite(model)[0] for name, rewrite in LEAN_REWRITES.items()}


def is_lean(model: nn.Module) -> bool:
    """Whether any of the rewrites is in effect in `model`."""
    return any(
        (isinstance(m, Upsample) and m.frozen_phase is not None)
        or (isinstance(m, BatchNorm) and m.folded)
        or (isinstance(m, SelfAttention) and m.frozen_qkv is not None)
        for m in model.modules()
    )
