#!/usr/bin/env bash
# DINO's weighted kNN (cosine, k = 10 and 20, T = 0.07) on the final CLS token of a pretraining run.
#   scripts/knn.sh RUN IMAGENET_ROOT [extra linear_eval.main flags, e.g. --student vit_tiny]   -> RUN/eval/knn/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN=${1:?usage: $0 RUN IMAGENET_ROOT(with train/ and val/) [extra flags]}
DATA=${2:?usage: $0 RUN IMAGENET_ROOT [extra flags]}
torchrun --nproc_per_node="${GPUS:-4}" -m linear_eval.main --mode knn --pretrained "$RUN" \
  --train-root "$DATA/train" --val-root "$DATA/val" \
  --batch-size 256 --knn-k 10 20 --knn-temperature 0.07 "${@:3}"
