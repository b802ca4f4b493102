# Sourced by every script: the repo's modules importable from any working directory, and the repo's
# .venv first on PATH when there is one (its python and torchrun). Paths given to a script stay relative
# to where it was started. Under sbatch the script runs from a spool copy: the repo is then
# $PROTEUS_REPO, else the directory sbatch was called from.
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${PROTEUS_REPO:-}" ]; then PROTEUS_REPO=${SLURM_SUBMIT_DIR:-$PWD}; fi
REPO=${PROTEUS_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -x "$REPO/.venv/bin/python" ]; then export PATH="$REPO/.venv/bin:$PATH"; fi
