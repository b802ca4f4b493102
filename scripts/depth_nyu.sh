#!/usr/bin/env bash
# NYU-Depth V2 monocular depth of a pretraining run's student (mmsegmentation 1.2.2 plugin): train, then test
# the best-RMSE checkpoint. Data preparation: depth/README.md.
#
#   bash scripts/depth_nyu.sh RUN {dpt|dpt-frozen|linear} [GPUS=4] [key=value ... (passed as --cfg-options)]
#   e.g. bash scripts/depth_nyu.sh output/proteus_small_dinov2 dpt 4
#        STUDENT=vit_tiny bash scripts/depth_nyu.sh output/family dpt 4          (several students: pick one)
#
# RUN: the run dir, its checkpoint.pth or an exported backbone. The work dir is
# RUN/eval/[<student>/]depth/<config name>, keyed by the backbone. The configs' recipe is 4 GPUs x 4 images;
# other GPU counts keep the global batch and lr (or --scale-lr). Re-running the same command resumes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN=${1:?usage: $0 RUN FAMILY [GPUS] [key=value ...]}
FAMILY=${2:?family: dpt, dpt-frozen or linear}
GPUS=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
PICK=(--backbone "$RUN"); [ -n "${STUDENT:-}" ] && PICK+=(--student "$STUDENT"); [ -n "${EMA:-}" ] && PICK+=(--ema)
OPTS=(); [ $# -gt 0 ] && OPTS=(--cfg-options "$@")

torchrun --nproc_per_node="$GPUS" -m depth.train "$FAMILY" "${PICK[@]}" --resume "${OPTS[@]}"
torchrun --nproc_per_node="$GPUS" -m depth.test "$FAMILY" "${PICK[@]}" "${OPTS[@]}"
