"""Import the official Keras `save_weights` HDF5 files with h5py (no TensorFlow).

Keras names layers with one counter per kind ("conv3d_12", "dense_3") in the order the model code
creates them, while the file lists them in topological order. So layers are matched kind by kind in
creation order: the file's by their counter, ours by registration order (components.py creates its
layers in the official order). Every shape is checked; any mismatch is an ArtifactError.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ldseg.errors import ArtifactError
from ldseg.model.components import ElementLayerNorm
from ldseg.model.layers import BatchNorm, GroupNorm, SameConv, SameConvTranspose

# Keras layer-name prefix -> our kind. The named output layers are the last of their kind.
_KIND_BY_PREFIX = {
    "conv2d": "conv",
    "conv3d": "conv",
    "denoiser_output": "conv",
    "conv2d_transpose": "conv_transpose",
    "conv3d_transpose": "conv_transpose",
    "batch_normalization": "bn",
    "embedding_output": "bn",
    "group_normalization": "gn",
    "layer_normalization": "ln",
    "encoder_output": "ln",
    "dense": "dense",
}
_NAMED_OUTPUTS = {"denoiser_output", "embedding_output", "encoder_output"}
_NAME = re.compile(r"^(?P<prefix>[a-z0-9_]+?)(?:_(?P<index>\d+))?$")


def _kind_of(module: nn.Module) -> str | None:
    kinds: list[tuple[type[nn.Module], str]] = [
        (SameConv, "conv"),
        (SameConvTranspose, "conv_transpose"),
        (BatchNorm, "bn"),
        (GroupNorm, "gn"),
        (ElementLayerNorm, "ln"),
        (nn.Linear, "dense"),
    ]
    return next((kind for cls, kind in kinds if isinstance(module, cls)), None)


def _read_file_layers(path: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Weights per kind, in Keras creation order: {kind: [{"kernel": ..., "bias": ...}, ...]}."""
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ArtifactError(f"{path}: not a readable Keras HDF5 weight file ({exc})") from exc
    found: dict[str, list[tuple[float, str, dict[str, np.ndarray]]]] = defaultdict(list)
    with handle:
        if "layer_names" not in handle.attrs:
            raise ArtifactError(f"{path}: no 'layer_names' attribute; not a Keras save_weights file")
        for raw in handle.attrs["layer_names"]:
            group = handle[raw.decode() if isinstance(raw, bytes) else raw]
            per_layer: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
            for wraw in group.attrs.get("weight_names", []):
                wname = wraw.decode() if isinstance(wraw, bytes) else wraw
                parts = wname.split("/")  # [outer, (inner,) "kernel:0"]
                per_layer[parts[-2]][parts[-1].split(":")[0]] = np.asarray(group[wname])
            for lname, weights in per_layer.items():
                match = _NAME.match(lname)
                kind = None
                if lname in _NAMED_OUTPUTS:
                    kind, order = _KIND_BY_PREFIX[lname], float("inf")
                elif match and match["prefix"] in _KIND_BY_PREFIX:
                    kind = _KIND_BY_PREFIX[match["prefix"]]
                    order = float(match["index"] or 0)
                if kind is None:
                    raise ArtifactError(f"{path}: layer {lname!r} is of a kind ldseg does not know")
                found[kind].append((order, lname, weights))
    return {kind: [w for _, _, w in sorted(items, key=lambda x: x[0])] for kind, items in found.items()}


def _converted(module: nn.Module, kind: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras arrays in PyTorch layout, keyed by the module's own parameter/buffer names."""
    if kind == "conv":
        kernel = weights["kernel"]  # (k..., in/groups, out) -> (out, in/groups, k...)
        nd = kernel.ndim - 2
        return {"conv.weight": kernel.transpose(nd + 1, nd, *range(nd)), "conv.bias": weights["bias"]}
    if kind == "conv_transpose":
        kernel = weights["kernel"]  # (k..., out, in) -> (in, out, k...)
        nd = kernel.ndim - 2
        return {"conv.weight": kernel.transpose(nd + 1, nd, *range(nd)), "conv.bias": weights["bias"]}
    if kind == "bn":
        return {
            "bn.weight": weights["gamma"],
            "bn.bias": weights["beta"],
            "bn.running_mean": weights["moving_mean"],
            "bn.running_var": weights["moving_variance"],
        }
    if kind == "gn":
        return {"weight": weights["gamma"], "bias": weights["beta"]}
    if kind == "ln":  # (*spatial, C) -> (C, *spatial)
        nd = weights["gamma"].ndim - 1
        perm = (nd, *range(nd))
        return {"weight": weights["gamma"].transpose(perm), "bias": weights["beta"].transpose(perm)}
    if kind == "dense":  # (in, out) -> (out, in)
        return {"weight": weights["kernel"].T, "bias": weights["bias"]}
    raise AssertionError(kind)


def load_keras_weights(component: nn.Module, path: Path) -> None:
    """Fill `component` in place from an official HDF5 file; raise ArtifactError on any mismatch."""
    file_layers = _read_file_layers(path)
    ours: dict[str, list[nn.Module]] = defaultdict(list)
    for module in component.modules():
        kind = _kind_of(module)
        if kind is not None:
            ours[kind].append(module)
    if {k: len(v) for k, v in ours.items()} != {k: len(v) for k, v in file_layers.items()}:
        counts = {k: (len(ours.get(k, [])), len(file_layers.get(k, []))) for k in set(ours) | set(file_layers)}
        raise ArtifactError(f"{path}: layers do not match a {type(component).__name__} (ours, file per kind: {counts})")
    for kind, modules in ours.items():
        for index, (module, weights) in enumerate(zip(modules, file_layers[kind])):
            state = module.state_dict()
            for name, array in _converted(module, kind, weights).items():
                if tuple(state[name].shape) != array.shape:
                    raise ArtifactError(
                        f"{path}: {kind} layer #{index} {name} has shape {array.shape}, "
                        f"expected {tuple(state[name].shape)}"
                    )
                state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            module.load_state_dict(state)
