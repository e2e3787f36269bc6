"""The gpu_check report: rewritten whole after every check, bounded by one time budget.

A GPU session is lent for minutes and may be stopped from outside; a report written only at the
end is then lost with everything that did finish. So `Report.write` replaces gpu_check.json
atomically after every check (and once before the first, saying the run is under way), `Budget`
hands each check the seconds left of the one budget for the whole run, and `Watchdog` writes the
report and ends the process when the budget runs out inside a check (a CUDA call cannot be
interrupted from Python), naming the check it stopped.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "ldseg-gpu-check/1"
WATCHDOG_EXIT = 3  # the process code when the watchdog ended the run

Result = dict[str, Any]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_head() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _version(module: str) -> str:
    """A module's version, or why it is not usable; never raises (a tensorrt wheel without
    libnvinfer raises OSError on import, a broken CUDA install anything at all)."""
    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - recorded: the environment section must survive any import
        return f"absent ({type(exc).__name__}: {exc})"
    return str(getattr(imported, "__version__", "present"))


def environment() -> dict[str, Any]:
    """What the run ran on. Survives any exception: a failure is recorded as the entry's value."""
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.node()}
    for module in ("torch", "onnxruntime", "tensorrt", "cuda.bindings", "nibabel"):
        info[module] = _version(module)
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gb": round(props.total_memory / 2**30, 1),
                "count": torch.cuda.device_count(),
            }
    except Exception as exc:  # noqa: BLE001 - recorded, as above
        info["gpu"] = f"unknown ({type(exc).__name__}: {exc})"
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:  # noqa: BLE001 - recorded, as above
        info["onnxruntime_providers"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


@dataclass
class Budget:
    """One budget for the whole run, from `started` on `clock` (seconds)."""

    seconds: float
    clock: Callable[[], float] = time.perf_counter
    started: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Report:
    """gpu_check.json in `out_dir`, rewritten after every check."""

    out_dir: Path
    budget: Budget
    prepared: dict[str, Any]
    results: dict[str, Result] = field(default_factory=dict)
    running: str | None = None  # the check under way, if any
    environment: dict[str, Any] = field(default_factory=environment)
    created: str = field(default_factory=now)

    @property
    def path(self) -> Path:
        return self.out_dir / "gpu_check.json"

    def summary(self) -> dict[str, Any]:
        statuses = [r["status"] for r in self.results.values()]
        return {
            "pass": statuses.count("pass"),
            "fail": statuses.count("fail"),
            "not_run": sum(s.startswith("not run") for s in statuses),
            "seconds": round(self.budget.elapsed(), 1),
            "budget_s": self.budget.seconds,
            "finished": self.running is None,
        }

    def write(self) -> Path:
        """The whole report, replaced atomically (a reader never sees half of it)."""
        report = {
            "schema": SCHEMA,
            "created": self.created,
            "updated": now(),
            "git": git_head(),
            "environment": self.environment,
            "prepared": self.prepared,
            "summary": self.summary(),
            "running": self.running,
            "checks": self.results,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
        return self.path

    def stopped(self, name: str, why: str) -> None:
        """Record the check under way as stopped (the watchdog, or an interrupt) and write."""
        self.results[name] = {"status": "fail", "error": f"stopped: {why}", "seconds": None}
        self.running = None
        self.write()


class Watchdog:
    """Writes the report and ends the process if a check runs past the budget."""

    def __init__(self, report: Report, exit: Callable[[int], None] = os._exit):
        self.report, self.exit = report, exit
        self.timer: threading.Timer | None = None

    def arm(self, name: str) -> None:
        self.disarm()
        self.timer = threading.Timer(max(self.report.budget.remaining(), 0.0), self.fire, args=(name,))
        self.timer.daemon = True
        self.timer.start()

    def fire(self, name: str) -> None:
        self.report.stopped(name, f"time budget of {self.report.budget.seconds:.0f} s ran out inside it")
        self.exit(WATCHDOG_EXIT)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
