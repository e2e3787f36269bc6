"""This process's TensorRT: importing the real library (not the type stubs), its logger, and the
machine an engine set is about to run on (TensorRT version, GPU)."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING

from ldseg.errors import BackendUnavailable
from ldseg.runtime.artifacts.engines import Environment
from ldseg.runtime.backends.tensorrt import compat as trt_compat

if TYPE_CHECKING:
    import tensorrt as trt


def require_tensorrt() -> ModuleType:
    """The real TensorRT module, or BackendUnavailable saying why not.

    `import tensorrt` succeeding proves nothing: with only `tensorrt-stubs` installed (the dev
    setup: type stubs, no libraries) it yields an empty namespace package. Real TensorRT has
    `Builder` and `__version__`.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        raise BackendUnavailable(
            f"TensorRT is not importable ({type(exc).__name__}: {exc}): pip install -e '.[tensorrt]' "
            "(Jetson: JetPack's python3-libnvinfer)"
        ) from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = ", ".join(str(p) for p in getattr(trt, "__path__", [])) or "?"
        raise BackendUnavailable(
            f"TensorRT is not installed: `tensorrt` imports as an empty package ({where}), i.e. only "
            "type stubs (tensorrt-stubs) are present: pip install -e '.[tensorrt]' on a machine with an NVIDIA GPU"
        )
    return trt


TRT_LOG = logging.getLogger("ldseg.tensorrt")
TRT_LOG.addHandler(logging.NullHandler())  # quiet unless the application configures logging


def trt_logger() -> trt.ILogger:
    """TensorRT's messages go to the `ldseg.tensorrt` logger (not Python warnings: TensorRT warns a
    lot, and the CLI must not print each as a RuntimeWarning); errors are also kept, so a failed
    build or run can say why in its one error line."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0 < ERROR 1 < WARNING 2 < INFO 3 < VERBOSE 4
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            TRT_LOG.log(_LOG_LEVELS.get(level, logging.DEBUG), "TensorRT: %s", msg)

    return _Logger()


_LOG_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}


def logged_errors(logger: trt.ILogger) -> str:
    errors: list[str] = getattr(logger, "errors", [])
    return "; ".join(errors[-5:]) if errors else "no error was logged"


def detect_environment(device: int = 0) -> Environment:
    """TensorRT version and GPU `device` of this machine; BackendUnavailable if either is absent."""
    trt = require_tensorrt()
    from ldseg.runtime.backends.tensorrt.cuda import gpu_info

    trt_compat.check_version(str(trt.__version__))  # refuses a TensorRT older than 10.3
    gpu = gpu_info(device)
    return Environment(str(trt.__version__), gpu.name, gpu.compute_capability)
