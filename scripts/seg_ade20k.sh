#!/usr/bin/env bash
# ADE20K semantic segmentation of a Proteus backbone (mmsegmentation 1.2.2 plugin): train, then test the
# best checkpoint. Data and backbone preparation: segmentation/README.md.
#
#   bash scripts/seg_ade20k.sh {upernet|linear} {t|s|b|l} [GPUS=4] [key=value ... (passed as --cfg-options)]
#   e.g. bash scripts/seg_ade20k.sh upernet s 4 model.backbone.checkpoint=/path/student_backbone.pth
#
# The configs assume 4 GPUs (global batch = GPUS x per-GPU batch in the file name). Re-running the same
# command resumes from the latest checkpoint in the work dir.
set -euo pipefail
FAMILY=${1:?family: upernet or linear}
SIZE=${2:?size: t, s, b or l}
GPUS=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
CONFIG=$(ls segmentation/configs/${FAMILY}_proteus-vit-${SIZE}14_*.py)
WORK=work_dirs/segmentation/$(basename "${CONFIG%.py}")
OPTS=(); [ $# -gt 0 ] && OPTS=(--cfg-options "$@")

torchrun --nproc_per_node="$GPUS" -m segmentation.train "$CONFIG" --work-dir "$WORK" --resume "${OPTS[@]}"
BEST=$(ls -t "$WORK"/best_mIoU_iter_*.pth | head -n 1)
torchrun --nproc_per_node="$GPUS" -m segmentation.test "$CONFIG" "$BEST" --work-dir "$WORK/test" "${OPTS[@]}"
