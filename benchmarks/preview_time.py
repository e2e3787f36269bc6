"""Time the preview picture (ldseg.qc.preview) on one real volume, without running the model.

The label stands in for the segmentation and its boundary for the entropy map (the entropy row's
cost does not depend on its values). Usage:
  python benchmarks/preview_time.py IMAGE.nii.gz LABEL.nii.gz [--repeat 5] [--out preview.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from ldseg.io.nifti import read_label_volume, read_volume
from ldseg.qc.preview import preview_3d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("label", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    image, seg = read_volume(args.image), read_label_volume(args.label).array
    entropy = (ndimage.morphological_gradient(seg, size=3) > 0).astype(np.float32) * 0.6
    for with_entropy in (False, True):
        times = []
        for _ in range(args.repeat):
            clock = time.perf_counter()
            png = preview_3d(image.array, seg, entropy if with_entropy else None, image.affine, args.image.name)
            times.append((time.perf_counter() - clock) * 1e3)
        print(
            f"shape {image.array.shape}, entropy row {with_entropy}: median {np.median(times):.0f} ms, "
            f"max {max(times):.0f} ms over {args.repeat}, {len(png)} bytes"
        )
    if args.out:
        args.out.write_bytes(png)


if __name__ == "__main__":
    main()
