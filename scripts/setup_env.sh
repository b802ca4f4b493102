#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv at the repo root).
# Idempotent and fast when nothing changed: pip only runs when a requirements file changed.
#   bash scripts/setup_env.sh              # venv + Python packages
#   bash scripts/setup_env.sh --demo-data  # also the Debian package with Fashion-MNIST (needs root/sudo)
# The demo's transfer set, scikit-learn's handwritten digits (sklearn.datasets.load_digits), ships inside the
# scikit-learn wheel pinned in requirements.txt: nothing more to install for it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--demo-data" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # not fatal: without it the demo stops with this same instruction and its tests are skipped
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } ||
    echo "setup_env.sh: could not install dataset-fashion-mnist; run: sudo apt-get install dataset-fashion-mnist" >&2
fi
