"""What the console scripts share: consoles, the entry point that turns LdsegError into one line and
its exit code, --version, and the choices (str Enums: a bad value is a usage error, exit 2, with the
choices listed, and --help lists them)."""

from __future__ import annotations

import enum
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

import ldseg
from ldseg.choices import BACKEND_CHOICES, DEVICES, RUN_PRECISIONS, SAMPLERS, VOLUME_OPS
from ldseg.errors import BackendUnavailable, LdsegError

console = Console(stderr=True)  # what the tools decide and report
out = Console()  # results: paths written, tables asked for


# What only `pip install 'ldseg[export]'` brings (export, training, calibration, the torch backend).
EXPORT_ONLY = ("torch", "onnxscript", "h5py")


def one_of(choices: tuple[str, ...], help: str) -> Any:
    """An option taking one value of its one list (ldseg.choices): anything else is a usage error
    (exit 2) listing them, and --help lists them. Add a value to the list, not here."""

    def parse(given: str) -> str:
        if given not in choices:
            raise typer.BadParameter(f"{given!r} is not one of {', '.join(map(repr, choices))}.")  # click's words
        return given

    return typer.Option(parser=parse, metavar="[" + "|".join(choices) + "]", help=help)


# Choices that only the export and training commands offer (str Enums; functional form: a dict
# literal keeps mypy able to check the members).
PresetChoice = enum.Enum("PresetChoice", {"knee3d": "knee3d", "glas2d": "glas2d", "demo": "demo"}, type=str)
CalibrationMethod = enum.Enum(
    "CalibrationMethod", {"minmax": "minmax", "entropy": "entropy", "percentile": "percentile"}, type=str
)
FreezeChoice = enum.Enum(
    "FreezeChoice", {"none": "none", "autoencoder": "autoencoder", "encoders": "encoders"}, type=str
)
LrScheduleChoice = enum.Enum("LrScheduleChoice", {"constant": "constant", "cosine": "cosine"}, type=str)
EngineChoice = enum.Enum("EngineChoice", {"local": "local", "ray": "ray"}, type=str)

# The model-source options ldseg-run and ldseg-serve share (runs/specs.ModelSpec), declared once.
CheckpointOption = Annotated[
    Optional[str], typer.Option(help="Checkpoint path, or 'demo' (the bundled model; the default).")
]
BundleOption = Annotated[Optional[Path], typer.Option(help="Exported ONNX bundle (ldseg-export onnx).")]
EnginesOption = Annotated[Optional[Path], typer.Option(help="TensorRT engine set (ldseg-export build-engine).")]
BackendOption = Annotated[str, one_of(BACKEND_CHOICES, help="Runtime; auto picks the fastest available.")]
DeviceOption = Annotated[str, one_of(DEVICES, help="Where to run; auto prefers a GPU.")]
PrecisionOption = Annotated[
    str,
    one_of(
        RUN_PRECISIONS,
        help="auto: what the source holds (never a silent reduction); bf16 (openvino, CPUs with native BF16), "
        "int8 (an int8 bundle). A backend that cannot honour it is refused before anything is built.",
    ),
]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads (default: all cores).")]
VolumeOpsOption = Annotated[
    str,
    one_of(
        VOLUME_OPS,
        help="Pre/post-processing (min-max, resampling, argmax): auto on the backend's device where it offers "
        "it; cpu always on the CPU reference path (numpy/scipy).",
    ),
]
SamplerOption = Annotated[Optional[str], one_of(SAMPLERS, help="Sampler (default: the checkpoint's).")]


def value(choice: enum.Enum | None) -> str | None:
    """The plain string the package API takes (None stays None)."""
    return None if choice is None else str(choice.value)


def plain(option: Any) -> Any:
    """An option as the package API takes it: a choice as its string, anything else unchanged."""
    return option.value if isinstance(option, enum.Enum) else option


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
            try:
                app(prog_name=prog)
            except ModuleNotFoundError as exc:  # the runtime-only install running an export-side command
                if (exc.name or "").split(".")[0] not in EXPORT_ONLY:
                    raise
                raise BackendUnavailable(
                    f"this needs {exc.name}, which the runtime-only install lacks: pip install 'ldseg[export]'"
                ) from exc
        except LdsegError as exc:
            console.print(f"[bold red]{prog}: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)

    return main
