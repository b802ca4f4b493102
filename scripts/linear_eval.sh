#!/usr/bin/env bash
# ImageNet linear probe of a pretraining run, DINOv2 protocol (52 heads, 10 epochs, SGD + cosine, best head on val).
#   scripts/linear_eval.sh RUN IMAGENET_ROOT [extra linear_eval.main flags]
#   e.g. scripts/linear_eval.sh output/proteus_small_dinov2 /data/imagenet            -> RUN/eval/linear/
#        scripts/linear_eval.sh output/family /data/imagenet --student vit_tiny --ema  -> RUN/eval/vit_tiny/linear_ema/
# RUN: the run dir (arch, sizes, patch and image size come from its config.json), its checkpoint.pth or an
# exported backbone. Defaults mirror the original run_probing.sh: GPUS=4 x 128 = global batch 512.
# Robustness sets: add e.g. --imagenet-a /data/imagenet-a --imagenet-c /data/imagenet-c (linear_eval/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN=${1:?usage: $0 RUN IMAGENET_ROOT(with train/ and val/) [extra flags]}
DATA=${2:?usage: $0 RUN IMAGENET_ROOT [extra flags]}
torchrun --nproc_per_node="${GPUS:-4}" -m linear_eval.main --pretrained "$RUN" \
  --train-root "$DATA/train" --val-root "$DATA/val" \
  --batch-size 128 --epochs 10 --eval-period 1250 --checkpoint-period 1250 "${@:3}"
