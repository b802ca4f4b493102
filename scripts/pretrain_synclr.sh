#!/usr/bin/env bash
# Proteus B/14 <- SynCLR ViT-L/14 (all three objectives, as DINOv2); every other setting is pretrain.main's
# default (the original's recipe).
#   scripts/pretrain_synclr.sh /data/imagenet/train /ckpt/synclr_vit_l_14.pth
# The student is the DINOv2 ViT-B/14, not the original's timm ViT (README: deviations).
# Global batch 512 whatever GPUS is (GLOBAL_BATCH, GPUS must divide it); MAX_RESTARTS: see pretrain_dinov2.sh.
set -euo pipefail
DATA=${1:-data/imagenet/train}
CKPT=${2:?usage: $0 IMAGENET_TRAIN_DIR SYNCLR_VIT_L14_CHECKPOINT [pretrain.main flags]}
GPUS=${GPUS:-8}
OUT=${OUT:-output/proteus_base_synclr}
torchrun --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-0}" -m pretrain.main \
  --data-path "$DATA" --output-dir "$OUT" --global-batch-size "${GLOBAL_BATCH:-512}" \
  --teacher synclr_vitl14 --teacher-checkpoint "$CKPT" --student vit_base "${@:3}"
