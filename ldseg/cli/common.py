"""What the console scripts share: consoles, the entry point that turns LdsegError into one line and
its exit code, --version, and the choices (str Enums: a bad value is a usage error, exit 2, with the
choices listed, and --help lists them)."""

from __future__ import annotations

import enum
import logging
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

import ldseg
from ldseg.errors import LdsegError

console = Console(stderr=True)  # what the tools decide and report
out = Console()  # results: paths written, tables asked for


class BackendChoice(str, enum.Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class DeviceChoice(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class SamplerChoice(str, enum.Enum):
    ddim = "ddim"
    ddpm = "ddpm"


class PresetChoice(str, enum.Enum):
    knee3d = "knee3d"
    glas2d = "glas2d"
    demo = "demo"


class ExportPrecision(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class EnginePrecision(str, enum.Enum):
    best = "best"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    fp8 = "fp8"


class CalibrationMethod(str, enum.Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class FreezeChoice(str, enum.Enum):
    none = "none"
    autoencoder = "autoencoder"
    encoders = "encoders"


class LrScheduleChoice(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"


def value(choice: enum.Enum | None) -> str | None:
    """The plain string the package API takes (None stays None)."""
    return None if choice is None else str(choice.value)


def _print_version(flag: bool) -> None:
    if flag:
        print(f"ldseg {ldseg.__version__}")
        raise typer.Exit()


VersionOption = Annotated[
    Optional[bool],
    typer.Option("--version", callback=_print_version, is_eager=True, help="Print the ldseg version and exit."),
]


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def entry(app: typer.Typer, prog: str) -> Callable[[], None]:
    """Run a Typer app; LdsegError -> 'prog: error: message' and its exit code, no traceback."""

    def main() -> None:
        # nibabel prints header fixes through its own stderr handler, in lines naming no file;
        # a refused file gets our one line instead.
        logging.getLogger("nibabel.global").setLevel(logging.CRITICAL)
        signal.signal(signal.SIGTERM, _terminate)  # clean up temp files as on Ctrl-C
        # Typer reports usage errors itself (exit 2); ours surface here as one line.
        try:
            app(prog_name=prog)
        except LdsegError as exc:
            console.print(f"[bold red]{prog}: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)

    return main
