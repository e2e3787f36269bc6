"""Test helpers (importable, unlike conftest.py): what makes an agreement or Dice check able to fail."""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldseg.data.phantoms import make_phantom
from ldseg.io.preprocess import min_max_standardize
from ldseg.model.config import ModelConfig, get_preset
from ldseg.model.network import LDSeg
from ldseg.runtime.backend import Backend, PipelineInputs, PipelineOutputs, make_inputs

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
OFFICIAL = SHARED_DATA / "official-keras-weights"
MIN_CLASS_FRACTION = 0.01  # a class must cover at least 1 % of the voxels to count


def assert_several_classes(
    labels: np.ndarray | Mapping[str, float], what: str = "reference labels", min_fraction: float = MIN_CLASS_FRACTION
) -> None:
    """At least two classes each cover >= `min_fraction` of the voxels of `labels` (a label array,
    or a {class: fraction} mapping as ldseg-bench records it).

    Call it on the reference of every agreement or Dice check: a model that puts (nearly) every voxel
    in one class agrees with anything of the same kind, so such a check could not fail."""
    if isinstance(labels, Mapping):
        fractions = {str(k): float(v) for k, v in labels.items()}
        assert abs(sum(fractions.values()) - 1.0) < 1e-6, f"{what}: class fractions {fractions} do not sum to 1"
    else:
        values, counts = np.unique(np.asarray(labels), return_counts=True)
        fractions = {str(v): float(c) / labels.size for v, c in zip(values.tolist(), counts.tolist())}
    big = [k for k, f in fractions.items() if f >= min_fraction]
    shown = ", ".join(f"{k}: {100 * f:.2f} %" for k, f in sorted(fractions.items()))
    assert len(big) >= 2, (
        f"{what}: only {len(big)} class(es) cover >= {100 * min_fraction:g} % of the voxels ({shown}); "
        "an agreement or Dice check on this output cannot fail"
    )


def assert_replays_follow_inputs(
    replayed: Backend, eager: Backend, requests: Sequence[PipelineInputs], *, atol: float, min_agreement: float = 0.999
) -> list[PipelineOutputs]:
    """For a backend that captures a (CUDA) graph on its first request and replays it after: every
    request's output equals `eager`'s on the same inputs (probabilities within `atol`, labels on a
    reference with several classes), and different requests give different outputs, so a replay that
    ignored its new inputs and returned the captured answer fails. Returns the replayed outputs."""
    outputs = []
    for k, inputs in enumerate(requests):
        got, ref = replayed.run(inputs, probabilities=True), eager.run(inputs, probabilities=True)
        assert got.probabilities is not None and ref.probabilities is not None
        assert_several_classes(ref.labels, f"request {k}: eager labels")
        err = float(np.abs(got.probabilities - ref.probabilities).max())
        assert err <= atol, f"request {k}: probabilities differ from eager by {err:.3g} > {atol}"
        same = float((got.labels == ref.labels).mean())
        assert same >= min_agreement, f"request {k}: {100 * same:.3f} % of labels equal eager's"
        outputs.append(got)
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            a, b = outputs[i], outputs[j]
            assert a.probabilities is not None and b.probabilities is not None
            diff = float(np.abs(a.probabilities - b.probabilities).max())
            assert diff > 10 * atol and (a.labels != b.labels).any(), (
                f"requests {i} and {j} gave the same output (max probability difference {diff:.3g})"
            )
    return outputs


def replay_requests(cfg: ModelConfig, images: np.ndarray, steps: int | None = None) -> list[PipelineInputs]:
    """Three requests of batch 2 for assert_replays_follow_inputs: the first is captured; the second
    has the same images and new seeds (new noise), the third new images and the first's seeds."""
    first, second = images[:2], images[2:4]
    assert len(first) == len(second) == 2, "give four images"
    return [
        make_inputs(cfg, first, [0, 1], steps),
        make_inputs(cfg, first, [2, 3], steps),
        make_inputs(cfg, second, [0, 1], steps),
    ]


def phantom_images(cfg: ModelConfig, seeds: Sequence[int]) -> np.ndarray:
    """Standardized phantom images (B, C, *grid) of the model's grid: what the demo model was trained on."""
    classes = min(max(cfg.num_classes, 2), 3)
    images = [min_max_standardize(make_phantom(s, cfg.image_size, classes).image) for s in seeds]
    return np.stack([np.repeat(image[None], cfg.image_channels, axis=0) for image in images]).astype(np.float32)


def shared_or_skip(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data checks need ../shared beside the repository")
    return path


def informative_model(preset: str, seed: int = 0) -> LDSeg:
    """Random weights, with every BatchNorm calibrated on random inputs.

    Untrained decoders put every voxel in one class (their logits barely vary), which would make
    label-agreement checks trivially 100 %; calibrated BN statistics give O(1) logits that vary
    across the volume, so the checks see real class boundaries and near-ties."""
    torch.manual_seed(seed)
    model = LDSeg(get_preset(preset))
    cfg = model.cfg
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(2):
            model.image_encoder(torch.rand((2, *cfg.image_shape), generator=gen))
            model.label_decoder(torch.randn((2, *cfg.latent_shape), generator=gen))
            model.encode_label(torch.randint(0, cfg.num_classes, (2, *cfg.image_size), generator=gen))
    return model.eval()


def output_names(folder: Path) -> list[str]:
    """The files a run left in `folder` (temp files included), less its run manifest and the manifest's lock."""
    from ldseg.runs.manifest import MANIFEST_NAME

    return sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST_NAME, f".{MANIFEST_NAME}.lock"))


def user_checkpoint(path: Path) -> Path:
    """The bundled demo model saved as a user's own checkpoint: same behaviour, another content hash
    (one bias nudged by 1e-6), so its first use exports instead of taking the shipped demo bundle."""
    from ldseg.model.checkpoint import save_checkpoint
    from ldseg.runtime.artifacts.source import load_model

    model = load_model("demo")
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if name.endswith("bias")).add_(1e-6)
    save_checkpoint(model, path, overwrite=True)
    return path


def ctrl_c_as_at_a_terminal() -> None:
    """Popen's preexec_fn for a child that a test interrupts: SIGINT back to its default, so Python
    installs its KeyboardInterrupt handler. A shell starts a background job (`bash .ci/run &`) with
    SIGINT ignored, the child inherits that, and the Ctrl-C a test sends would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
