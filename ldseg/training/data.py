"""Training data: a folder of image/label pairs, or phantoms generated on the fly.

Either way a sample arrives on the model grid: image float32 (C, *grid) min-max'ed to [0, 1],
label uint8 (*grid) of class ids. The order of samples is a pure function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ldseg.errors import InputError
from ldseg.model.config import ModelConfig

PHANTOMS = "phantoms"
TRAIN_SEED0 = 10_000  # training phantoms: seeds 10_000 + i
VAL_SEED0 = 9_000  # validation phantoms: seeds 9_000 + i; seeds 0..999 stay unseen for evaluation
_NIFTI = re.compile(r"^(?P<name>.+)\.nii(\.gz)?$", re.IGNORECASE)
_IMAGE_2D = re.compile(r"^(?P<name>.+)\.(png|bmp|tif|tiff|jpg|jpeg)$", re.IGNORECASE)
_CACHE_BYTES = 2 << 30  # folder samples kept in memory up to this size; the rest re-read


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # float32 (C, *grid) in [0, 1]
    label: np.ndarray  # uint8 (*grid)
    name: str


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def _minmax(array: np.ndarray) -> np.ndarray:
    x = np.asarray(array, dtype=np.float32)
    x = x - x.min()
    peak = x.max()
    return x / peak if peak > 0 else x


class PhantomSource:
    """Phantoms for fixed seeds, made on first use and kept (0.7 MB each at the demo size)."""

    def __init__(self, cfg: ModelConfig, seeds: Sequence[int]):
        from ldseg.data.phantoms import make_phantom

        self._make = make_phantom
        self.cfg = cfg
        self.seeds = [int(s) for s in seeds]
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> Sample:
        if index not in self._cache:
            seed = self.seeds[index]
            ph = self._make(seed, shape=self.cfg.image_size, num_classes=self.cfg.num_classes)
            # Multi-channel presets (glas2d: RGB) see the grey phantom in every channel.
            image = np.repeat(_minmax(ph.image)[None], self.cfg.image_channels, axis=0)
            self._cache[index] = Sample(image=image, label=ph.label, name=f"phantom-{seed}")
        return self._cache[index]


class FolderSource:
    """Image/label pairs read and resampled to the model grid on first use."""

    def __init__(self, cfg: ModelConfig, pairs: Sequence[tuple[str, Path, Path]]):
        self.cfg = cfg
        self.pairs = list(pairs)
        self._cache: dict[int, Sample] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        if index in self._cache:
            return self._cache[index]
        name, image_path, label_path = self.pairs[index]
        sample = _read_pair(self.cfg, name, image_path, label_path)
        size = sample.image.nbytes + sample.label.nbytes
        if self._cached_bytes + size <= _CACHE_BYTES:
            self._cache[index] = sample
            self._cached_bytes += size
        return sample


def _read_pair(cfg: ModelConfig, name: str, image_path: Path, label_path: Path) -> Sample:
    from ldseg.io.preprocess import image_to_model_grid, labels_to_model_grid

    grid = cfg.image_size
    if cfg.spatial_dims == 3:
        from ldseg.io.nifti import read_label_volume, read_volume

        image = image_to_model_grid(read_volume(image_path).array, grid)[None]
        label = labels_to_model_grid(read_label_volume(label_path).array, grid, cfg.num_classes)
    else:
        from ldseg.io.image2d import read_image2d, read_label2d

        image = image_to_model_grid(read_image2d(image_path).array, grid)
        label = labels_to_model_grid(read_label2d(label_path), grid, cfg.num_classes)
    if image.shape[0] != cfg.image_channels:
        raise InputError(
            f"{image_path}: {image.shape[0]} channel(s), preset {cfg.preset!r} expects {cfg.image_channels}"
        )
    return Sample(image=np.ascontiguousarray(image, dtype=np.float32), label=label, name=name)


def find_pairs(root: Path, spatial_dims: int) -> list[tuple[str, Path, Path]]:
    """Pair `root/images/NAME.EXT` with `root/labels/NAME.EXT`, sorted by NAME.

    The rule: the two files have the same name. For 3D presets EXT is `.nii.gz` or `.nii`; for
    2D presets `.png`, `.bmp`, `.tif(f)` or `.jp(e)g` (the label may use another of these).
    Hidden files are skipped. An image without a label (or a label without an image) is an
    InputError naming it: silently dropping cases would shrink the training set unnoticed.
    """
    pattern = _NIFTI if spatial_dims == 3 else _IMAGE_2D
    found: dict[str, dict[str, Path]] = {"images": {}, "labels": {}}
    for kind in found:
        folder = Path(root) / kind
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder (expected {root}/images and {root}/labels)")
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if path.name.startswith(".") or not path.is_file() or match is None:
                continue
            name = match.group("name")
            if name in found[kind]:
                raise InputError(f"{path}: two files named {name!r} in {folder}")
            found[kind][name] = path
    images, labels = found["images"], found["labels"]
    lonely = sorted(set(images) ^ set(labels))
    if lonely:
        shown = ", ".join(lonely[:5]) + (" ..." if len(lonely) > 5 else "")
        raise InputError(f"{root}: {len(lonely)} image(s)/label(s) without a partner: {shown}")
    if not images:
        raise InputError(f"{root}/images: no {'NIfTI' if spatial_dims == 3 else 'image'} files")
    return [(name, images[name], labels[name]) for name in sorted(images)]


def open_sources(data: str, cfg: ModelConfig, num_train: int, val: int) -> tuple[Source, Source]:
    """(training, validation) sources for `--data`."""
    if data == PHANTOMS:
        train = PhantomSource(cfg, range(TRAIN_SEED0, TRAIN_SEED0 + num_train))
        return train, PhantomSource(cfg, range(VAL_SEED0, VAL_SEED0 + val))
    pairs = find_pairs(Path(data), cfg.spatial_dims)
    if val >= len(pairs):
        raise InputError(f"{data}: {len(pairs)} pair(s), too few to hold out --val {val} for validation")
    # The last `val` pairs by name are held out: a fixed, documented split.
    cut = len(pairs) - val
    return FolderSource(cfg, pairs[:cut]), FolderSource(cfg, pairs[cut:])


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder waits for the next shuffle: batch norm in the
    label autoencoder dislikes tiny trailing batches)."""
    return max(num_samples // batch_size, 1)


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Sample indices of global step `step`: one shuffle per epoch, seeded by (seed, epoch)."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    if num_samples < batch_size:  # tiny datasets: repeat the permutation to fill the batch
        order = np.resize(order, batch_size)
    return [int(i) for i in order[position * batch_size : (position + 1) * batch_size]]
