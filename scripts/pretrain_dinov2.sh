#!/usr/bin/env bash
# Proteus from DINOv2 teachers, one node (the paper's pairs): Ti/14 <- S/14, S/14 <- B/14, B/14 <- L/14, L/14 <- g/14.
#   scripts/pretrain_dinov2.sh small /data/imagenet/train            # Proteus-S
#   GPUS=4 scripts/pretrain_dinov2.sh base /data/imagenet/train      # any GPU count: still 512 images per step
# Everything not set here is pretrain.main's default, which is the original's recipe (300 epochs, 5 warmup,
# lr 5e-4 at 512, masking 0.5 / 0.5, all lambdas 1). The global batch is the original run_pretrain.sh's
# 512 (4 GPUs x 128) whatever GPUS is: pretrain.main splits it over the processes (GPUS must divide it);
# GLOBAL_BATCH=1024 gives the 8 x 128 the paper reportedly used, with lr scaled linearly to 1e-3.
# Teacher weights download from dl.fbaipublicfiles.com unless TEACHER_CKPT is set.
# Rerunning the same command resumes from OUT/checkpoint.pth.
# torchrun restarts the whole worker group on ANY non-zero worker exit, and cannot tell a crash from
# pretrain.main's 2 (bad configuration) or 3 (non-finite loss), which would only fail again; so restarts are
# off (MAX_RESTARTS=0). For flaky nodes set MAX_RESTARTS=N: restarted workers resume from the checkpoint.
# torchrun itself exits 1 whenever a worker failed (its log names the worker's exit code: 75 = preempted
# after a checkpoint, rerun; 3 = non-finite loss; 2 = bad configuration).
set -euo pipefail
SIZE=${1:-small}
DATA=${2:-data/imagenet/train}
GPUS=${GPUS:-8}
case "$SIZE" in
  tiny)  STUDENT=vit_tiny;  TEACHER=dinov2_vits14 ;;
  small) STUDENT=vit_small; TEACHER=dinov2_vitb14 ;;
  base)  STUDENT=vit_base;  TEACHER=dinov2_vitl14 ;;
  large) STUDENT=vit_large; TEACHER=dinov2_vitg14 ;;
  *) echo "usage: $0 {tiny|small|base|large} IMAGENET_TRAIN_DIR [pretrain.main flags]" >&2; exit 2 ;;
esac
OUT=${OUT:-output/proteus_${SIZE}_dinov2}
torchrun --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-0}" -m pretrain.main \
  --data-path "$DATA" --output-dir "$OUT" --global-batch-size "${GLOBAL_BATCH:-512}" \
  --teacher "$TEACHER" ${TEACHER_CKPT:+--teacher-checkpoint "$TEACHER_CKPT"} --student "$STUDENT" "${@:3}"
