#!/usr/bin/env bash
# One pretraining run of configs/pretrain/ on this node: which config, how many GPUs.
#   GPUS=8 scripts/pretrain.sh configs/pretrain/vit_small_dinov2.yaml --data-path /data/imagenet/train
#   GPUS=4 scripts/pretrain.sh configs/pretrain/vit_base_clip.yaml --data-path ... --teacher-checkpoint ViT-L-14.pt
# GPUS: any count that divides the config's global batch (512: the original's 4 x 128). Further flags pass
# through to pretrain.main and win over the config. Rerunning the same command resumes.
# MAX_RESTARTS (default 0): torchrun restarts the whole worker group on ANY non-zero exit and cannot tell a
# crash from pretrain.main's 2 (bad configuration) or 3 (non-finite loss), which would only fail again; for
# flaky nodes set MAX_RESTARTS=N (restarted workers resume from the checkpoint). torchrun exits 1 whenever a
# worker failed; its log names the worker's code (75 = preempted after a checkpoint: rerun).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # the repo's .venv when present
CONFIG=${1:?usage: $0 CONFIG [pretrain.main flags]}
torchrun --nproc_per_node="${GPUS:-8}" --max-restarts="${MAX_RESTARTS:-0}" -m pretrain.main -c "$CONFIG" "${@:2}"
