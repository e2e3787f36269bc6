"""The accuracy gate of the torch backend's reduced precisions (bf16, fp16).

Before a reduced precision runs a model, the backend made for it and an FP32 reference on the same
weights (eager, TF32 off) segment GATE_PHANTOMS synthetic phantoms (ldseg.data.phantoms, the
model's default steps and sampler, noise seed = phantom seed); the share of voxels whose label is
the same, pooled over the phantoms, must reach GATE_AGREEMENT (issue 31's bar), else the request is
refused (BackendUnavailable naming the measured agreement and suggesting --precision fp32).

The verdict is cached on disk (`<cache root>/precision-gate/`), keyed by the checkpoint's content
hash, the precision, the device kind (the GPU's name, or cpu), the torch and ldseg versions, the
gate's own settings and the digest of the code that decides the labels (GATE_CODE: the model, this
backend, the phantoms), so a second process reads it instead of running the gate again, and a
verdict on other numerics (an edited layer, a new autocast rule) is never reused; a cached failure
refuses before any backend is made. A model without a checkpoint hash, or an install without its
sources, is measured every time. The verdict in words is the backend's `gate` (describe(), and the
first screen's reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldseg.data.phantoms import phantom_model_image
from ldseg.errors import BackendUnavailable
from ldseg.runtime.artifacts.cache import cache_root
from ldseg.runtime.artifacts.code_digest import code_digest
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.torch.backend import TorchBackend
from ldseg.versions import LDSEG_VERSION

GATE_AGREEMENT = 0.995  # share of voxels equal to FP32 (issue 31)
GATE_PHANTOMS = 4
GATE_DIR = "precision-gate"
GATE_CODE = ("model", "runtime/backends/torch", "data/phantoms.py")  # below ldseg/: what decides the labels


@dataclass(frozen=True)
class Verdict:
    precision: str
    device_kind: str
    agreement: float  # pooled over the phantoms
    worst: float  # the lowest phantom's agreement
    phantoms: int
    steps: int
    seconds: float  # what measuring it took (both precisions)
    cached: bool = False

    @property
    def passed(self) -> bool:
        return self.agreement >= GATE_AGREEMENT

    def words(self) -> str:
        source = ", cached" if self.cached else f", measured in {self.seconds:.1f} s"
        return (
            f"{self.precision} gate: {100 * self.agreement:.2f} % of voxels equal to fp32 on {self.phantoms} phantoms "
            f"(worst {100 * self.worst:.2f} %, bar {100 * GATE_AGREEMENT:.1f} %{source})"
        )

    def refusal(self) -> str:
        return (
            f"torch {self.precision} on {self.device_kind} agrees with fp32 on {100 * self.agreement:.2f} % of voxels "
            f"over {self.phantoms} phantoms (worst {100 * self.worst:.2f} %), below the {100 * GATE_AGREEMENT:.1f} % "
            "bar: use --precision fp32"
        )


def device_kind(device: str) -> str:
    """The GPU's name for cuda:N (a verdict holds for that kind of GPU), else "cpu"."""
    target = torch.device(device)
    if target.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(target.index or 0)


def verdict_path(checkpoint_hash: str, precision: str, kind: str) -> Path | None:
    """Where the verdict is kept; None without the sources to key it by."""
    code = code_digest(*GATE_CODE)
    if code is None:
        return None
    key = {
        "checkpoint_sha256": checkpoint_hash,
        "precision": precision,
        "device_kind": kind,
        "torch": torch.__version__,
        "ldseg": LDSEG_VERSION,
        "phantoms": GATE_PHANTOMS,
        "bar": GATE_AGREEMENT,
        "code": code,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    return cache_root() / GATE_DIR / f"{checkpoint_hash[:16]}-{precision}-{slug}-{digest}.json"


def cached_verdict(checkpoint_hash: str | None, precision: str, device: str) -> Verdict | None:
    """The verdict an earlier process stored for this checkpoint, precision and device kind, if any."""
    if checkpoint_hash is None:
        return None
    path = verdict_path(checkpoint_hash, precision, device_kind(device))
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
        return Verdict(**{**raw, "cached": True})
    except (OSError, ValueError, TypeError):  # absent, or unreadable: measured again
        return None


def _store(verdict: Verdict, checkpoint_hash: str) -> None:
    path = verdict_path(checkpoint_hash, verdict.precision, verdict.device_kind)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(verdict), f, indent=1)
        os.replace(tmp, path)  # whole or absent, for a concurrent reader
    except OSError:  # a read-only cache costs a re-measurement next time, nothing else
        pass


def measure(backend: TorchBackend, phantoms: int = GATE_PHANTOMS) -> Verdict:
    """Labels of `backend` against FP32 eager on the same weights, form (lean or official) and device,
    on `phantoms` phantoms: what the reduced precision alone changes."""
    start = time.perf_counter()
    reference = TorchBackend(backend.model, backend.device, cuda_graph=False)  # shares the model: no copy
    equal, total, worst = 0, 0, 1.0
    for seed in range(phantoms):
        inputs = make_inputs(backend.config, phantom_model_image(backend.config, seed)[None], [seed])
        got, want = backend.run(inputs).labels, reference.run(inputs).labels
        same = int(np.count_nonzero(got == want))
        equal, total, worst = equal + same, total + want.size, min(worst, same / want.size)
    reference.close()
    return Verdict(
        precision=backend.precision,
        device_kind=device_kind(backend.device),
        agreement=equal / total,
        worst=worst,
        phantoms=phantoms,
        steps=int(backend.config.diffusion.steps),
        seconds=time.perf_counter() - start,
    )


def hold(backend: TorchBackend, checkpoint_hash: str | None, verdict: Verdict | None = None) -> Verdict:
    """The gate for a reduced-precision backend: `verdict` (a cached one) or a new measurement, stored;
    BackendUnavailable where it fails. Sets the backend's `gate` to the verdict in words."""
    if verdict is None:
        verdict = measure(backend)
        if checkpoint_hash is not None:
            _store(verdict, checkpoint_hash)
    if not verdict.passed:
        raise BackendUnavailable(verdict.refusal())
    backend.gate = verdict.words()
    return verdict
