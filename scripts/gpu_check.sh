#!/usr/bin/env bash
# One-command GPU check (about 8 minutes on one GPU; needs only torch, torchvision, timm, tensorboard, numpy;
# downloads nothing): CUDA training steps under bf16 and fp16, SIGTERM + resume, one epoch with
# --data-pipeline gpu (nvJPEG decode + augmentation on the GPU), a linear_eval and a
# fine_grained feature pass, then tools.benchmark for S/14 <- B/14 and B/14 <- L/14 at 224 px, eager and
# --compile. One JSON report (path printed). On a machine without a CUDA GPU it exits 0 at once.
#   bash scripts/gpu_check.sh [--out output/gpu_check.json] [--budget-s 450] [--bench-batch 128]
#   bash scripts/gpu_check.sh --device cpu --dry-run      # the same path with tiny sizes, on CPU
# Logic and the list of checks: tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export HF_HUB_OFFLINE=1
# no GPU: say so before paying for `import torch` (tools.gpu_check checks torch.cuda again)
no_gpu() {
  [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] && return 0
  if command -v nvidia-smi >/dev/null 2>&1; then ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; return; fi
  ! ls /dev/nvidia[0-9]* >/dev/null 2>&1
}
if [[ " $* " != *" --dry-run "* ]] && no_gpu; then
  echo "gpu_check: no CUDA GPU is visible; nothing to check on this machine (the CPU test suite covers the" \
       "rest; --device cpu --dry-run runs this check's path on CPU)."
  exit 0
fi
exec "$PY" -m tools.gpu_check "$@"
