#!/usr/bin/env bash
# The evaluations of a pretraining run on SLURM, one node: the GPU count comes from SLURM's environment
# (SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE; GPUS overrides) and the job runs the eval script unchanged.
# Submit from the repo root (or set PROTEUS_REPO):
#   sbatch --gpus-per-node=4 scripts/slurm_eval.sh linear RUN /data/imagenet        # scripts/linear_eval.sh
#   sbatch --gpus-per-node=4 scripts/slurm_eval.sh knn RUN /data/imagenet           # scripts/knn.sh
#   sbatch --gpus-per-node=1 scripts/slurm_eval.sh fine_grained RUN                 # scripts/fine_grained_all.sh
#   sbatch --gpus-per-node=4 scripts/slurm_eval.sh seg RUN upernet                  # scripts/seg_ade20k.sh
#   sbatch --gpus-per-node=4 scripts/slurm_eval.sh depth RUN dpt                    # scripts/depth_nyu.sh
# Further arguments go to the script (flags of linear_eval.main / fine_grained.main; key=value cfg-options
# for the dense runs; STUDENT=KEY picks a student of a several-student run there). Results: RUN/eval/.
# The dense runs keep the recipe's global batch on any GPU count (common/mmseg_plugin/launch.py).
# Preemption: --requeue reruns the same command, and every evaluation resumes or redoes its own work
# (linear_eval from its checkpoint, the dense runs with --resume in their backbone-keyed work dir).
#SBATCH --job-name=proteus-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=40
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
source "${PROTEUS_REPO:-${SLURM_SUBMIT_DIR:-.}}/scripts/env.sh"
TASK=${1:?usage: $0 TASK RUN [args of that script], TASK one of linear knn fine_grained seg depth}
GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-4}}}
export GPUS=${GPUS##*:}  # SLURM_GPUS_PER_NODE may read "a100:4"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$TASK" in
  linear) exec bash "$REPO/scripts/linear_eval.sh" "${@:2}" ;;
  knn) exec bash "$REPO/scripts/knn.sh" "${@:2}" ;;
  fine_grained) exec bash "$REPO/scripts/fine_grained_all.sh" "${@:2}" ;;
  seg) exec bash "$REPO/scripts/seg_ade20k.sh" "$2" "$3" "$GPUS" "${@:4}" ;;
  depth) exec bash "$REPO/scripts/depth_nyu.sh" "$2" "$3" "$GPUS" "${@:4}" ;;
  *) echo "slurm_eval.sh: unknown task $TASK (linear, knn, fine_grained, seg, depth)" >&2; exit 2 ;;
esac
