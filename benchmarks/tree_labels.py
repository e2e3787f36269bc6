"""Did a change to the model's code move its labels? One volume segmented by another checkout and by
this one (same checkpoint, backend and device; each in its own process), compared voxel by voxel and
against the truth. Not a test: it prints what it measured.

    git worktree add /tmp/old-tree <old commit>
    python benchmarks/tree_labels.py --old-tree /tmp/old-tree --checkpoint work/knee/k30.safetensors \
        --image ../shared/data/knee/images/case4.nii.gz --label ../shared/data/knee/labels/case4.nii.gz
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ldseg.metrics import dice_per_class

HERE = Path(__file__).resolve().parents[1]
SEGMENT = """
import sys
import numpy as np
import ldseg
checkpoint, image, backend, device, out = sys.argv[1:6]
with ldseg.Segmenter(checkpoint=checkpoint, backend=backend, device=device) as seg:
    [result] = seg.segment(image)
np.save(out, np.asarray(result.labels))
"""


def segment(tree: Path, args: argparse.Namespace, out: Path) -> np.ndarray:
    command = [sys.executable, "-c", SEGMENT, *(str(Path(p).resolve()) for p in (args.checkpoint, args.image))]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # LDSEG_CACHE as the caller set it (a bundle backend exports)
    subprocess.run([*command, args.backend, args.device, str(out)], check=True, cwd=tree, env=env)
    return np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--label", type=Path, required=True)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = segment(args.old_tree.resolve(), args, Path(tmp) / "old.npy")
        new = segment(HERE, args, Path(tmp) / "new.npy")
    truth = np.asarray(nib.load(args.label).dataobj).astype(np.uint8)
    classes = int(max(old.max(), new.max(), truth.max())) + 1
    print(" ".join(sys.argv))
    print(f"voxels whose labels differ: {int((old != new).sum())} of {old.size}")
    for name, labels in (("old", old), ("new", new)):
        scores = dice_per_class(labels, truth, classes)
        print(f"Dice {name}: " + " / ".join(f"{scores[c]:.4f}" for c in sorted(scores)))


if __name__ == "__main__":
    main()
