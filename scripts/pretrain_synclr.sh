#!/usr/bin/env bash
# Proteus B/14 <- SynCLR ViT-L/14 (all three objectives, as DINOv2).
#   scripts/pretrain_synclr.sh /data/imagenet/train /ckpt/synclr_vit_l_14.pth
set -euo pipefail
DATA=${1:-data/imagenet/train}
CKPT=${2:?usage: $0 IMAGENET_TRAIN_DIR SYNCLR_VIT_L14_CHECKPOINT}
GPUS=${GPUS:-8}
OUT=${OUT:-output/proteus_base_synclr}
torchrun --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-3}" -m pretrain.main \
  --data-path "$DATA" --output-dir "$OUT" --teacher synclr_vitl14 --teacher-checkpoint "$CKPT" \
  --student vit_base --patch-size 14 --input-size 224 --batch-size "${BATCH:-128}" \
  --epochs 300 --warmup-epochs 5 --lr 5e-4 --mask-probability 0.5 --mask-ratio 0.5 \
  --lambda-token 1.0 --lambda-fea 1.0 --lambda-patch 1.0 "${@:3}"
