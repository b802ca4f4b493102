#!/usr/bin/env bash
# Proteus B/14 <- CLIP ViT-L/14 (token objective only: CLIP's patch tokens carry no training signal).
#   scripts/pretrain_clip.sh /data/imagenet/train /ckpt/ViT-L-14.pt
# The checkpoint is OpenAI's release (ViT-L-14.pt) or a state dict of its visual tower; see models/teachers.py.
set -euo pipefail
DATA=${1:-data/imagenet/train}
CKPT=${2:?usage: $0 IMAGENET_TRAIN_DIR CLIP_VIT_L14_CHECKPOINT}
GPUS=${GPUS:-8}
OUT=${OUT:-output/proteus_base_clip}
torchrun --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-3}" -m pretrain.main \
  --data-path "$DATA" --output-dir "$OUT" --teacher clip_vitl14 --teacher-checkpoint "$CKPT" \
  --student vit_base --patch-size 14 --input-size 224 --batch-size "${BATCH:-128}" \
  --epochs 300 --warmup-epochs 5 --lr 5e-4 --lambda-token 1.0 --lambda-fea 0.0 --lambda-patch 0.0 "${@:3}"
