#!/usr/bin/env bash
# DINO's weighted kNN (cosine, k = 10 and 20, T = 0.07) on the final CLS token.
#   scripts/knn.sh /data/imagenet output/pretrain/student_backbone.pth [extra flags]
set -euo pipefail
DATA=${1:?usage: $0 IMAGENET_ROOT(with train/ and val/) CHECKPOINT [extra flags]}
CKPT=${2:?usage: $0 IMAGENET_ROOT CHECKPOINT [extra flags]}
GPUS=${GPUS:-4}
ARCH=${ARCH:-vit_small}
OUT=${OUT:-output/knn/$(basename "${CKPT%.*}")_${ARCH}}
torchrun --nproc_per_node="$GPUS" -m linear_eval.main --mode knn \
  --train-root "$DATA/train" --val-root "$DATA/val" --arch "$ARCH" --patch-size 14 --pretrained "$CKPT" \
  --batch-size 256 --knn-k 10 20 --knn-temperature 0.07 --output-dir "$OUT" "${@:3}"
