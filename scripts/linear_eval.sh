#!/usr/bin/env bash
# ImageNet linear probe, DINOv2 protocol (52 heads, 10 epochs, SGD + cosine, best head on val).
#   scripts/linear_eval.sh /data/imagenet output/pretrain/student_backbone.pth [extra flags]
# Defaults mirror the original run_probing.sh: 4 GPUs x 128 = global batch 512, one epoch = 2502 iterations.
# Robustness sets: add e.g. --imagenet-a /data/imagenet-a --imagenet-c /data/imagenet-c (see linear_eval/README.md).
set -euo pipefail
DATA=${1:?usage: $0 IMAGENET_ROOT(with train/ and val/) CHECKPOINT [extra flags]}
CKPT=${2:?usage: $0 IMAGENET_ROOT CHECKPOINT [extra flags]}
GPUS=${GPUS:-4}
ARCH=${ARCH:-vit_small}
OUT=${OUT:-output/linear_eval/$(basename "${CKPT%.*}")_${ARCH}}
torchrun --nproc_per_node="$GPUS" -m linear_eval.main \
  --train-root "$DATA/train" --val-root "$DATA/val" --arch "$ARCH" --patch-size 14 --pretrained "$CKPT" \
  --batch-size 128 --epochs 10 --eval-period 1250 --checkpoint-period 1250 --output-dir "$OUT" "${@:3}"
