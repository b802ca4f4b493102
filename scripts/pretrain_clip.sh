#!/usr/bin/env bash
# Proteus B/14 <- CLIP ViT-L/14. CLIP's patch tokens carry no training signal, so pretrain.main trains the
# token objective only for it (the original's lambdas 1 / 0 / 0); every other setting is pretrain.main's
# default (the original's recipe).
#   scripts/pretrain_clip.sh /data/imagenet/train /ckpt/ViT-L-14.pt
# The checkpoint is OpenAI's release (ViT-L-14.pt) or a state dict of its visual tower; see models/teachers.py.
# The student is the DINOv2 ViT-B/14, not the original's CLIP-style ViT (README: deviations).
# Global batch 512 whatever GPUS is (GLOBAL_BATCH, GPUS must divide it); MAX_RESTARTS: see pretrain_dinov2.sh.
set -euo pipefail
DATA=${1:-data/imagenet/train}
CKPT=${2:?usage: $0 IMAGENET_TRAIN_DIR CLIP_VIT_L14_CHECKPOINT [pretrain.main flags]}
GPUS=${GPUS:-8}
OUT=${OUT:-output/proteus_base_clip}
torchrun --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-0}" -m pretrain.main \
  --data-path "$DATA" --output-dir "$OUT" --global-batch-size "${GLOBAL_BATCH:-512}" \
  --teacher clip_vitl14 --teacher-checkpoint "$CKPT" --student vit_base "${@:3}"
