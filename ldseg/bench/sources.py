"""What is benchmarked: the model (preset with random weights, checkpoint, or bundle + checkpoint)
and the input images (synthetic phantoms, or volumes/images from a folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldseg.bench.accuracy import truth_folders
from ldseg.data.phantoms import phantom_model_image
from ldseg.errors import ArtifactError, InputError
from ldseg.model.checkpoint import load_checkpoint, read_metadata
from ldseg.model.config import ModelConfig, get_preset
from ldseg.model.network import LDSeg
from ldseg.runs.volumes import Prepared, is_input_file, prepare
from ldseg.runtime.artifacts.source import demo_checkpoint_path, resolve_checkpoint


@dataclass(frozen=True)
class ModelSource:
    model: LDSeg
    info: dict[str, Any]


def load_source(preset: str | None, checkpoint: str | Path | None, bundle: Path | None, seed: int) -> ModelSource:
    """Exactly one of preset / checkpoint / bundle (a bundle may come with its checkpoint)."""
    if preset is not None and (checkpoint is not None or bundle is not None):
        raise InputError("--preset builds random weights: give it without --checkpoint or --bundle")
    if bundle is not None:
        return _bundle_source(bundle, checkpoint)
    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint)
        model = load_checkpoint(path).eval()
        return ModelSource(model, _info(model.cfg, f"checkpoint {path}", model.checkpoint_hash, model.trained))
    name = preset or "demo"
    torch.manual_seed(seed)
    model = LDSeg(get_preset(name)).eval()
    return ModelSource(
        model, _info(model.cfg, f"preset {name}, random weights (torch seed {seed})", None, model.trained)
    )


def _bundle_source(bundle_path: Path, checkpoint: str | Path | None) -> ModelSource:
    from ldseg.runtime.artifacts.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    if checkpoint is None:  # the bundled demo model is the one checkpoint findable without a path
        demo = demo_checkpoint_path()
        if (
            bundle.checkpoint_hash is None
            or not demo.is_file()
            or read_metadata(demo).get("content_sha256") != bundle.checkpoint_hash
        ):
            raise InputError(
                f"{bundle_path}: the torch FP32 reference needs the weights the bundle was exported from; "
                f"add --checkpoint (bundle made from checkpoint sha256 {str(bundle.checkpoint_hash)[:12]})"
            )
        checkpoint = demo
    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint(path).eval()
    bundle.check_compatible(model.cfg)
    if bundle.checkpoint_hash is not None and bundle.checkpoint_hash != model.checkpoint_hash:
        raise ArtifactError(f"{bundle_path}: exported from checkpoint {bundle.checkpoint_hash[:12]}, not from {path}")
    info = _info(
        model.cfg,
        f"bundle {bundle_path} ({bundle.precision}) with checkpoint {path}",
        model.checkpoint_hash,
        model.trained,
    )
    return ModelSource(model, info)


def _info(cfg: ModelConfig, weights: str, digest: str | None, trained: dict[str, bool]) -> dict[str, Any]:
    return {
        "preset": cfg.preset,
        "weights": weights,
        "checkpoint_sha256": digest,
        "trained": trained,
        "image_shape": list(cfg.image_shape),
        "latent_shape": list(cfg.latent_shape),
        "num_classes": cfg.num_classes,
        "sampler": cfg.diffusion.sampler,
        "default_steps": cfg.diffusion.steps,
    }


def load_images(
    cfg: ModelConfig, count: int, data: Path | None, seed: int
) -> tuple[np.ndarray, dict[str, Any], list[Prepared] | None]:
    """`count` model-grid images (count, C, *grid): phantoms seed.., or a folder's files in name
    order (cycled when the folder has fewer than `count`), with their Prepared (None for phantoms).
    A folder holding images/ (and labels/) is read from images/."""
    if data is None:
        images = [phantom_model_image(cfg, seed + k) for k in range(count)]
        return np.stack(images), {"source": "phantoms", "seeds": [seed + k for k in range(count)]}, None
    if not data.is_dir():
        raise InputError(f"{data}: --data must be a folder of volumes or images")
    folder, _ = truth_folders(data)
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_input_file(p))
    if not files:
        raise InputError(f"{folder}: no .nii/.nii.gz/.png/.bmp/.jpg/.tif files in this folder")
    chosen = [files[k % len(files)] for k in range(count)]
    prepared = {p: prepare(p, cfg) for p in dict.fromkeys(chosen)}
    items = [prepared[p] for p in chosen]
    return np.stack([item.image for item in items]), {"source": str(folder), "files": [p.name for p in chosen]}, items
