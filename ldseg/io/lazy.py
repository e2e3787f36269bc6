"""Modules imported on first use: SimpleITK, pydicom and highdicom cost about half of the run path's
import time, and a NIfTI-in, NIfTI-out run never touches them."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for module `name` and imports it on the first attribute asked for (thread-safe: the
    read-ahead thread and the main thread may both be first)."""

    def __init__(self, name: str):
        super().__init__(name)
        self._lock = threading.Lock()
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        with self._lock:
            if self._module is None:
                self._module = importlib.import_module(self.__name__)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") and attr in ("_lock", "_module"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)


def lazy_module(name: str) -> Any:
    return LazyModule(name)
