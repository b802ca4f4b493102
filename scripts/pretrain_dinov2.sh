#!/usr/bin/env bash
# Proteus from DINOv2 teachers, one node (the paper's pairs): Ti/14 <- S/14, S/14 <- B/14, B/14 <- L/14, L/14 <- g/14.
#   scripts/pretrain_dinov2.sh small /data/imagenet/train            # Proteus-S (default recipe)
# Global batch = GPUS x BATCH (the paper: 1024 on 8 GPUs; the original script: 128 x 4 = 512); the lr scales
# linearly from 5e-4 at 512. Teacher weights download from dl.fbaipublicfiles.com unless TEACHER_CKPT is set.
# Rerunning the same command resumes from OUT/checkpoint.pth.
set -euo pipefail
SIZE=${1:-small}
DATA=${2:-data/imagenet/train}
GPUS=${GPUS:-8}
BATCH=${BATCH:-128}
case "$SIZE" in
  tiny)  STUDENT=vit_tiny;  TEACHER=dinov2_vits14 ;;
  small) STUDENT=vit_small; TEACHER=dinov2_vitb14 ;;
  base)  STUDENT=vit_base;  TEACHER=dinov2_vitl14 ;;
  large) STUDENT=vit_large; TEACHER=dinov2_vitg14 ;;
  *) echo "usage: $0 {tiny|small|base|large} IMAGENET_TRAIN_DIR" >&2; exit 2 ;;
esac
OUT=${OUT:-output/proteus_${SIZE}_dinov2}
torchrun --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-3}" -m pretrain.main \
  --data-path "$DATA" --output-dir "$OUT" \
  --teacher "$TEACHER" ${TEACHER_CKPT:+--teacher-checkpoint "$TEACHER_CKPT"} \
  --student "$STUDENT" --patch-size 14 --input-size 224 --batch-size "$BATCH" \
  --epochs 300 --warmup-epochs 5 --lr 5e-4 --mask-probability 0.5 --mask-ratio 0.5 \
  --lambda-token 1.0 --lambda-fea 1.0 --lambda-patch 1.0 "${@:3}"
