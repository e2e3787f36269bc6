#!/usr/bin/env bash
# The real-data path on the official knee weights (issue: training). Nothing it writes is committed:
# outputs go to work/knee (git-ignored). Leaves case4 out of training and reports its Dice.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
W=$DATA/official-keras-weights
OUT=work/knee
mkdir -p "$OUT/train/images" "$OUT/train/labels"
for c in case1 case2 case3; do   # case4 is held out
  ln -sf "$(realpath $DATA/knee/images/$c.nii.gz)" "$OUT/train/images/$c.nii.gz"
  ln -sf "$(realpath $DATA/knee/labels/$c.nii.gz)" "$OUT/train/labels/$c.nii.gz"
done
.venv/bin/ldseg-export import-keras --preset knee3d --label-encoder $W/labelEncoder3D.hdf5 \
  --label-decoder $W/labelDecoder3D.hdf5 --image-encoder $W/imageEncoder3D.hdf5 \
  -o "$OUT/official.safetensors" --overwrite
# The released label autoencoder and image encoder stay frozen: their latents are computed once per
# (case, flips) and only the denoiser trains, in the 8x8x16 latent space. No validation split
# during training (three cases are few enough); case4 is scored afterwards through ldseg-run.
# --device auto trains on the GPU when PyTorch sees one (bit-reproducible on the CPU only; --threads
# applies to the CPU).
time .venv/bin/ldseg-train --preset knee3d --data "$OUT/train" --init "$OUT/official.safetensors" \
  --freeze encoders --steps "${KNEE_STEPS:-1000}" --batch-size 3 --noise-draws 16 --val 0 \
  --checkpoint-every 500 ${KNEE_FLIPS:+--flips} --lr 1e-3 --lr-schedule cosine --device auto --threads 2 \
  -o "$OUT/knee3d.safetensors" --overwrite
.venv/bin/ldseg-run $DATA/knee/images/case4.nii.gz --checkpoint "$OUT/knee3d.safetensors" -o "$OUT/seg" --overwrite
.venv/bin/python - "$OUT/seg/case4_seg.nii.gz" "$DATA/knee/labels/case4.nii.gz" <<'PY'
import sys, nibabel as nib, numpy as np
from ldseg.metrics import dice_per_class
pred, truth = (np.asarray(nib.load(p).dataobj) for p in sys.argv[1:3])
print("case4 Dice per class:", {c: round(d, 4) for c, d in dice_per_class(pred, truth, 3).items()})
PY
