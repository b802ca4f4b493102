#!/usr/bin/env bash
# NYU-Depth V2 monocular depth of a Proteus backbone (mmsegmentation 1.2.2 plugin): train, then test the
# best-RMSE checkpoint. Data and backbone preparation: depth/README.md.
#
#   bash scripts/depth_nyu.sh {dpt|dpt-frozen|linear} {t|s|b|l} [GPUS=4] [key=value ... (passed as --cfg-options)]
#   e.g. bash scripts/depth_nyu.sh dpt s 4 model.backbone.checkpoint=/path/student_backbone.pth
#
# The configs assume 4 GPUs x 4 images. Re-running the same command resumes from the latest checkpoint.
set -euo pipefail
FAMILY=${1:?family: dpt, dpt-frozen or linear}
SIZE=${2:?size: t, s, b or l}
GPUS=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
CONFIG=$(ls depth/configs/${FAMILY}_proteus-vit-${SIZE}14_*.py)
WORK=work_dirs/depth/$(basename "${CONFIG%.py}")
OPTS=(); [ $# -gt 0 ] && OPTS=(--cfg-options "$@")

torchrun --nproc_per_node="$GPUS" -m depth.train "$CONFIG" --work-dir "$WORK" --resume "${OPTS[@]}"
BEST=$(ls -t "$WORK"/best_rmse_iter_*.pth | head -n 1)
torchrun --nproc_per_node="$GPUS" -m depth.test "$CONFIG" "$BEST" --work-dir "$WORK/test" "${OPTS[@]}"
