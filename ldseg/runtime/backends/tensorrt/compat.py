"""TensorRT 10.x and 11.x differences, detected in this one place (no hasattr elsewhere).

Jetson stays on TensorRT 10 (10.3 on JetPack 6, apt, no pip wheel); x86 pip installs 11.x. What
ldseg touches that differs (../shared/docs/tensorrt.md, NVIDIA's 10 -> 11 migration guide):

- network creation: STRONGLY_TYPED is referred to by name (1 in 10, 0 and always on in 11;
  EXPLICIT_BATCH is gone in 11);
- weak typing (BuilderFlag.FP16/INT8, precision constraints) exists in 10 only: ldseg never uses
  it (precision lives in the ONNX graph), the builder only records whether it was there;
- activation memory: `device_memory_size_v2` (10.1+; the old property is removed in 11) and
  `set_device_memory(ptr, size)` (10.1+; the `device_memory` setter is removed in 11);
- the engine inspector's JSON lists I/O under "Bindings" in 10 and "I/O Tensors" in 11;
- activation memory sized to the current input shapes (`update_device_memory_size_for_shapes`, and
  the RUNTIME_ACTIVATION_RESIZE_10_10 preview feature that makes it shrink below the profile's
  maximum): absent before 10.10, where the profile's maximum is what a context needs.

Engines are not portable across versions at all, and never across majors: engines.json records
the major (runtime/artifacts/engines.py refuses a set from another one with that reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ldseg.errors import BackendUnavailable

MIN_VERSION = (10, 3)  # JetPack 6's TensorRT: the oldest ldseg builds and runs with
INSPECTOR_IO_KEYS = ("I/O Tensors", "Bindings")  # 11, then 10


@dataclass(frozen=True)
class TrtApi:
    """What this TensorRT offers, read once from the module."""

    version: str
    major: int
    network_flags: int  # for builder.create_network: strongly typed
    weak_typing: bool  # BuilderFlag.FP16 exists (10.x); removed in 11

    def describe(self) -> dict[str, Any]:
        return {"tensorrt_major": self.major, "strongly_typed": True, "weak_typing_flags_present": self.weak_typing}


def check_version(version: str) -> tuple[int, int]:
    """(major, minor); BackendUnavailable below 10.3 or for an unreadable version."""
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError as exc:
        raise BackendUnavailable(f"TensorRT reports version {version!r}, which ldseg cannot read") from exc
    if (major, minor) < MIN_VERSION:
        raise BackendUnavailable(f"TensorRT {version} is too old: ldseg needs 10.3 or newer (JetPack 6 has 10.3)")
    return major, minor


def api(trt: ModuleType) -> TrtApi:
    """Feature detection over an imported TensorRT module; BackendUnavailable below 10.3."""
    version = str(trt.__version__)
    major, _ = check_version(version)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
    return TrtApi(version, major, flags, hasattr(trt.BuilderFlag, "FP16"))


def device_memory_size(engine: Any) -> int:
    """Activation memory an execution context needs (device_memory_size_v2; 10.0 only has the old name)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def set_device_memory(context: Any, ptr: int, nbytes: int) -> None:
    """Give a USER_MANAGED context its activation memory (`set_device_memory` from 10.1, the only way in 11)."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, nbytes)
    else:  # 10.0's property setter
        context.device_memory = ptr


def allow_activation_resize(config: Any, trt: ModuleType) -> bool:
    """Let a context's activation memory follow its input shapes (10.10+); False where it cannot."""
    feature = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if feature is None:
        return False
    config.set_preview_feature(feature, True)
    return True


def activation_size_for_shapes(context: Any, engine: Any) -> int:
    """Activation memory the context needs for the input shapes set on it (the engine's maximum where
    this TensorRT cannot tell)."""
    update = getattr(context, "update_device_memory_size_for_shapes", None)
    return int(update()) if update is not None else device_memory_size(engine)


def inspector_io(info: dict[str, Any]) -> list[Any]:
    """The I/O tensors of an engine inspector JSON document, whichever major wrote it."""
    for key in INSPECTOR_IO_KEYS:
        if key in info:
            return list(info[key])
    return []


def layer_summary(info_json: str) -> dict[str, int]:
    """Counts from the inspector JSON: layers, I/O tensors, and layers with an INT8 tensor format."""
    info = json.loads(info_json)
    layers = info.get("Layers", [])
    int8 = sum(1 for layer in layers if "Int8" in json.dumps(layer))
    return {"layers": len(layers), "io_tensors": len(inspector_io(info)), "int8_layers": int8}
