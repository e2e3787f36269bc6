"""What every backend declares about itself (its package's `declaration.py`), so that selection
(ldseg/runtime/select.py) is only the auto order and one loop, and a request a backend cannot honour
is refused before anything is exported, built or loaded.

A declaration says what sources the backend runs, on which devices, at which precisions, how many
samples (K) at most, why it cannot run here at all (its probe), and how it is made. Everything but
`make` is cheap: it reads manifests and asks the installed libraries, never exports or builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ldseg.errors import BackendUnavailable

if TYPE_CHECKING:
    from ldseg.model.config import ModelConfig
    from ldseg.runtime.artifacts.source import Source
    from ldseg.runtime.backend import Backend

# The ways to give a model, as Source.kind names them (ldseg/runtime/artifacts/source.py).
CHECKPOINT, BUNDLE, ENGINES = "checkpoint", "bundle", "engines"
_OPTION = {CHECKPOINT: "--checkpoint", BUNDLE: "--bundle", ENGINES: "--engines"}
_WHAT = {CHECKPOINT: "a checkpoint", BUNDLE: "an exported bundle", ENGINES: "an engine set"}


@dataclass(frozen=True)
class Request:
    """What one candidate is asked to honour: the source on one device ("cpu" or "cuda:N")."""

    source: Source
    device: str
    precision: str = "auto"  # "auto": what the source holds
    threads: int | None = None  # None: the backend's default (all cores)
    max_samples: int = 1  # the largest K a run will ask for (engines are built for it)

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


class Made(NamedTuple):
    backend: Backend
    config: ModelConfig
    checkpoint_hash: str | None  # content SHA-256 of the checkpoint behind it, where known
    gate: str | None = None  # a reduced precision's accuracy verdict in words (the first screen shows it)


def any_k(request: Request) -> int | None:
    """The capacity of a backend that runs any K (it sizes its buffers per run)."""
    return None


@dataclass(frozen=True)
class Declaration:
    name: str
    sources: tuple[str, ...]  # CHECKPOINT, BUNDLE, ENGINES; a checkpoint on a bundle/engine backend needs the cache
    devices: tuple[str, ...]  # "cpu", "cuda"
    # Each of these sees the request and none exports, builds or loads a model:
    probe: Callable[[Request], str | None]  # why it cannot run here at all (not installed, no GPU), or None
    precisions: Callable[[Request], tuple[str, ...]]  # what it runs for this source and device
    make: Callable[[Request], Made]  # the one step that may export, build and load
    capacity: Callable[[Request], int | None] = any_k  # the largest K (None: any)
    exports: bool = True  # a checkpoint runs through the artifact cache's bundle (False: the checkpoint itself)

    def runs(self, source: Source) -> bool:
        """This backend can run this kind of source (a checkpoint through the cache, where it exports)."""
        if source.kind not in self.sources:
            return False
        return source.kind != CHECKPOINT or not self.exports or source.artifacts is not None

    def refusal(self, request: Request) -> str | None:
        """Why this backend cannot honour `request`, with what to do, or None: asked in this order
        (the source, the device, the machine, the precision, K) and before anything is made."""
        source, name = request.source, self.name
        if not self.runs(source):
            kind = next(k for k in self.sources if k != CHECKPOINT or not self.exports) if self.sources else CHECKPOINT
            return f"the {name} backend runs {_WHAT[kind]} ({_OPTION[kind]})"
        if ("cuda" if request.on_gpu else "cpu") not in self.devices:
            if "cuda" in self.devices:
                return f"the {name} backend needs --device cuda (or auto on a GPU machine)"
            return f"the {name} backend runs on the CPU (--device cpu, or auto)"
        problem = self.probe(request)
        if problem:
            return problem
        if request.precision != "auto":
            runs = self.precisions(request)
            if request.precision not in runs:
                held = ", ".join(runs) or "nothing"
                return (
                    f"the {name} backend runs {held} here, not {request.precision}: use --precision auto"
                    f"{' or ' + runs[0] if runs else ''}, or another --backend"
                )
        capacity = self.capacity(request)
        if capacity is not None and request.max_samples > capacity:
            return (
                f"the {name} backend here takes at most {capacity} samples per run, not {request.max_samples}: "
                f"rebuild the engines with ldseg-export build-engine --max-batch {request.max_samples}, "
                "or run a checkpoint (engines built for the K asked)"
            )
        return None

    def select(self, request: Request) -> Made:
        """Made as asked, or BackendUnavailable saying why not (before anything is exported or built)."""
        problem = self.refusal(request)
        if problem:
            raise BackendUnavailable(problem)
        return self.make(request)
