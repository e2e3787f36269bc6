"""The small pieces: EMA math, losses, augmentation, data order and folder pairing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldseg.errors import InputError
from ldseg.model.config import get_preset
from ldseg.training import augment
from ldseg.training.data import FolderSource, batch_indices, find_pairs, steps_per_epoch
from ldseg.training.ema import EMA
from ldseg.training.losses import dice_per_class, segmentation_loss, soft_dice


def test_ema_update_math() -> None:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.0)
    ema = EMA(layer, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(1 / 10)
    assert ema.decay_at(10**6) == 0.999
    with torch.no_grad():
        layer.weight.fill_(3.0)
    ema.update(layer)  # d = 0.1: 0.1 * 1 + 0.9 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 2.8))
    with torch.no_grad():
        layer.weight.fill_(5.0)
    ema.update(layer)  # d = 2 / 11
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), d * 2.8 + (1 - d) * 5.0))
    assert ema.updates == 2


def test_ema_fixed_decay_after_warmup() -> None:
    layer = nn.Linear(1, 1, bias=False)
    ema = EMA(layer, decay=0.9, updates=1000)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer)
    assert torch.allclose(ema.shadow["weight"], 0.9 * start + 0.1 * layer.weight)


def test_ema_swapped_restores_weights() -> None:
    layer = nn.Linear(2, 2)
    ema = EMA(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.add_(1.0)
    raw = layer.weight.detach().clone()
    with ema.swapped(layer):
        assert torch.equal(layer.weight, ema.shadow["weight"])
    assert torch.equal(layer.weight, raw)


def test_soft_dice_and_segmentation_loss() -> None:
    label = torch.tensor([[0, 1, 2, 2]])
    perfect = torch.nn.functional.one_hot(label, 3).movedim(-1, 1).float()
    assert float(soft_dice(perfect, label)) == pytest.approx(1.0, abs=1e-6)
    good = segmentation_loss(perfect * 20.0, label)
    bad = segmentation_loss(perfect.flip(1) * 20.0, label)
    assert float(good) < 0.01 < 2.0 < float(bad)


def test_dice_per_class() -> None:
    label = torch.tensor([[0, 1, 1, 2]])
    pred = torch.tensor([[0, 1, 2, 2]])
    dice = dice_per_class(pred, label, 3)
    assert dice.shape == (1, 2)
    assert dice[0, 0].item() == pytest.approx(2 / 3) and dice[0, 1].item() == pytest.approx(2 / 3)
    # a class absent from both scores 1
    assert dice_per_class(torch.zeros(1, 4), torch.zeros(1, 4), 3).tolist() == [[1.0, 1.0]]


def test_augmentation_flips_image_and_label_together() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = [augment.draw(gen, 3, flips=True, intensity=True) for _ in range(16)]
    assert any(d.flips for d in draws) and all(0.9 <= d.scale <= 1.1 for d in draws)
    d = augment.Draw(flips=(0, 2), scale=1.0, shift=0.0)
    label = torch.arange(24).reshape(2, 3, 4)
    image = label[None].float()
    assert torch.equal(augment.apply_image(image, d)[0], augment.apply_label(label, d).float())
    assert augment.apply_label(label, d)[0, 0, 0] == label[1, 0, 3]
    off = augment.draw(torch.Generator().manual_seed(0), 3, flips=False, intensity=False)
    assert off == augment.Draw((), 1.0, 0.0)


def test_batch_order_is_a_function_of_seed_and_step() -> None:
    n, b = 10, 3
    per_epoch = steps_per_epoch(n, b)
    epoch = [i for s in range(per_epoch) for i in batch_indices(n, b, seed=7, step=s)]
    assert len(set(epoch)) == len(epoch) == per_epoch * b  # no repeats within an epoch
    assert batch_indices(n, b, 7, 4) == batch_indices(n, b, 7, 4)
    assert batch_indices(n, b, 7, 0) != batch_indices(n, b, 8, 0)
    assert len(batch_indices(1, 2, 0, 0)) == 2  # tiny sets still fill a batch


def _write_pair(root: Path, name: str, seed: int, label: bool = True) -> None:
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti

    ph = make_phantom(seed, shape=(16, 24, 24))
    (root / "images").mkdir(exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    label_path = root / "labels" / f"{name}.nii.gz" if label else root / f"{name}-unused.nii.gz"
    write_phantom_nifti(ph, root / "images" / f"{name}.nii.gz", label_path, overwrite=False)


def test_folder_pairs_by_name_and_resamples(tmp_path: Path) -> None:
    _write_pair(tmp_path, "b", 2)
    _write_pair(tmp_path, "a", 1)
    pairs = find_pairs(tmp_path, 3)
    assert [p[0] for p in pairs] == ["a", "b"]
    cfg = get_preset("demo")
    sample = FolderSource(cfg, pairs)[0]
    assert sample.image.shape == (1, *cfg.image_size) and sample.image.dtype == np.float32
    assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0
    assert sample.label.shape == cfg.image_size and set(np.unique(sample.label)) <= {0, 1, 2}


def test_folder_without_partner_is_an_input_error(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a", 1)
    _write_pair(tmp_path, "lonely", 2, label=False)
    with pytest.raises(InputError, match="lonely"):
        find_pairs(tmp_path, 3)
    with pytest.raises(InputError, match="no such folder"):
        find_pairs(tmp_path / "missing", 3)
