"""Optional torch.compile of the torch backend's image encoder, denoiser step and decoder (CUDA only).

Asked for with `TorchBackend(..., compile=True)` or LDSEG_TORCH_COMPILE=1. Inductor's on-disk cache
goes under the project's cache folder (`<cache root>/torch-inductor`) unless TORCHINDUCTOR_CACHE_DIR
names another, so a second process (after a reboot too) reuses the compiled kernels instead of
compiling again. Torch writes its own default, in the temp folder, into that variable the first time
it resolves its folder (a torch.export in the same process does): that value is not taken for a
choice. Compiling happens on a stage's first call; its time is what `state()` reports (the
backend's describe()). Where torch.compile raises, at wrapping or at the first call, the stage
warns once with the reason and runs eagerly from then on: the result is the eager result.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

from ldseg.runtime.artifacts.cache import cache_root

COMPILE_ENV = "LDSEG_TORCH_COMPILE"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_wanted(asked: bool | None) -> bool:
    """`asked`, or (None) whether LDSEG_TORCH_COMPILE is set to a true value."""
    if asked is not None:
        return asked
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def inductor_cache_dir() -> str:
    """Inductor's cache folder: TORCHINDUCTOR_CACHE_DIR if someone chose it, else under the project's
    cache root."""
    configured = os.environ.get(INDUCTOR_CACHE_ENV)
    if configured and not _torch_default(configured):
        return configured
    path = cache_root() / "torch-inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_CACHE_ENV] = str(path)  # read by inductor when it first compiles
    return str(path)


def _torch_default(path: str) -> bool:
    """Whether `path` is Inductor's own default, <temp folder>/torchinductor_<user>: torch puts it in
    os.environ the first time it resolves its cache folder, so it is no one's choice."""
    folder = os.path.abspath(path)
    in_temp = os.path.dirname(folder) == os.path.abspath(tempfile.gettempdir())
    return in_temp and os.path.basename(folder).startswith("torchinductor_")


class Compiled:
    """`fn`, compiled on its first call when `enabled`; eager (with one warning) where compiling fails."""

    def __init__(self, name: str, fn: Callable[..., Any], enabled: bool):
        self.name, self.eager = name, fn
        self.enabled = enabled
        self.compiled: Callable[..., Any] | None = None
        self.seconds: float | None = None  # the first (compiling) call
        self.failed: str | None = None
        if enabled:
            try:
                import torch

                inductor_cache_dir()
                # Specialized to each shape: a run has a few fixed plans (batch 1, K), and a second
                # batch size then compiles again instead of making every kernel shape-generic.
                self.compiled = torch.compile(fn, dynamic=False)
            except Exception as exc:  # noqa: BLE001 - any failure to compile means eager, said once
                self._fall_back(exc)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        try:
            if self.seconds is not None:
                return self.compiled(*args)
            start = time.perf_counter()
            out = self.compiled(*args)
            self.seconds = time.perf_counter() - start
            return out
        except Exception as exc:  # noqa: BLE001 - compile errors surface at the first call
            self._fall_back(exc)
            return self.eager(*args)

    def _fall_back(self, exc: BaseException) -> None:
        self.compiled = None
        self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        warnings.warn(f"torch.compile of the {self.name} failed, running it eagerly: {self.failed}", stacklevel=3)

    def state(self) -> str:
        """In words for describe(): off, on (not yet called / compiled in N s), or failed (eager)."""
        if not self.enabled:
            return f"{self.name} off"
        if self.failed is not None:
            return f"{self.name} failed, eager ({self.failed})"
        if self.seconds is None:
            return f"{self.name} on (compiles on first call)"
        return f"{self.name} compiled in {self.seconds:.1f} s (cache {os.environ.get(INDUCTOR_CACHE_ENV, '')})"
