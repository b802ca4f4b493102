#!/usr/bin/env bash
# The test command: set up (or refresh) the environment, then run the whole suite on CPU, offline.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --demo-data
export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
exec .venv/bin/python -m pytest -q "$@"
