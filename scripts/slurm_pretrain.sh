#!/usr/bin/env bash
# Multi-node Proteus pretraining on SLURM: one srun task per node, each running torchrun over its GPUs.
# Submit from the repo root (or set PROTEUS_REPO); the #SBATCH lines are defaults, sbatch flags override them:
#   sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=80 scripts/slurm_pretrain.sh \
#       -c configs/pretrain/vit_small_dinov2.yaml --data-path /data/imagenet/train
# Nodes, GPUs and CPUs come from SLURM's environment (SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE or
# SLURM_GPUS_PER_NODE, SLURM_CPUS_PER_TASK); NNODES, GPUS_PER_NODE, NUM_WORKERS override them. DataLoader
# workers per GPU default to CPUs per node / GPUs per node - 1 (passed as --num-workers before your flags,
# so a --num-workers of yours wins). Docs: docs/cluster.md.
# Preemption / time limit: SLURM sends SIGUSR1 to this batch shell 180 s before the end (--signal=B:USR1@180).
# The trap forwards SIGTERM to the job step; torchrun passes it to every worker, each finishes its step,
# rank 0 writes checkpoint.pth and the workers exit with code 75 (EX_TEMPFAIL, "checkpoint written, run
# again"). The trap then requeues the job; the requeued job runs the same command and resumes from
# --output-dir. torchrun gives workers 30 s after forwarding a signal: enough for one step + one save.
# Exit codes of pretrain.main: 0 done, 75 preempted (requeue), 3 non-finite loss (do not requeue), 2 bad config.
# The configs/pretrain/ files set the original's global batch of 512 whatever the node and GPU count
# (nodes x GPUs per node must divide it).
#SBATCH --job-name=proteus
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
source "${PROTEUS_REPO:-${SLURM_SUBMIT_DIR:-.}}/scripts/env.sh"
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # SLURM_GPUS_PER_NODE may read "a100:8"
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
NUM_WORKERS=${NUM_WORKERS:-$(( CPUS / GPUS_PER_NODE > 1 ? CPUS / GPUS_PER_NODE - 1 : 1 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
echo "proteus: $NNODES node(s) x $GPUS_PER_NODE GPU(s), $CPUS CPUs per node, $NUM_WORKERS loader workers per GPU"

requeue() {
  echo "SIGUSR1: asking the trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  kill -TERM "$SRUN_PID" 2>/dev/null
  wait "$SRUN_PID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m pretrain.main --num-workers "$NUM_WORKERS" "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=$?
# torchrun reports any worker failure (75 included) as its own exit 1, so requeueing is the trap's job.
# torchrun --max-restarts=N would restart the workers after ANY non-zero exit, 2 (bad config) and 3
# (non-finite loss) included, which only fail again: 0 by default; MAX_RESTARTS=N for flaky nodes
# (restarted workers resume from the checkpoint by themselves).
exit "$STATUS"
