#!/usr/bin/env bash
# ADE20K semantic segmentation of a pretraining run's student (mmsegmentation 1.2.2 plugin): train, then test
# the best checkpoint. Data preparation: segmentation/README.md.
#
#   bash scripts/seg_ade20k.sh RUN {upernet|linear} [GPUS=4] [key=value ... (passed as --cfg-options)]
#   e.g. bash scripts/seg_ade20k.sh output/proteus_small_dinov2 upernet 4
#        STUDENT=vit_tiny bash scripts/seg_ade20k.sh output/family linear 4     (several students: pick one)
#
# RUN: the run dir (its student's size picks the config, its weights the backbone), its checkpoint.pth or an
# exported backbone. The work dir is RUN/eval/[<student>/]segmentation/<config name> (keyed by the backbone:
# another backbone never resumes this one's checkpoint). The configs' recipe is 4 GPUs x per-GPU batch; on
# another GPU count the per-GPU batch follows so the global batch and lr stay (see common/mmseg_plugin/launch.py;
# --scale-lr is the alternative). Re-running the same command resumes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN=${1:?usage: $0 RUN FAMILY [GPUS] [key=value ...]}
FAMILY=${2:?family: upernet or linear}
GPUS=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
PICK=(--backbone "$RUN"); [ -n "${STUDENT:-}" ] && PICK+=(--student "$STUDENT"); [ -n "${EMA:-}" ] && PICK+=(--ema)
OPTS=(); [ $# -gt 0 ] && OPTS=(--cfg-options "$@")

torchrun --nproc_per_node="$GPUS" -m segmentation.train "$FAMILY" "${PICK[@]}" --resume "${OPTS[@]}"
torchrun --nproc_per_node="$GPUS" -m segmentation.test "$FAMILY" "${PICK[@]}" "${OPTS[@]}"
