#!/usr/bin/env bash
# Multi-node Proteus pretraining on SLURM: one srun task per node, each running torchrun over its GPUs.
#   sbatch --nodes=2 scripts/slurm_pretrain.sh -c configs/pretrain/vit_small_dinov2.yaml --data-path /data/imagenet/train
# Preemption / time limit: SLURM sends SIGUSR1 to this batch shell 180 s before the end (--signal=B:USR1@180).
# The trap forwards SIGTERM to the job step; torchrun passes it to every worker, each finishes its step,
# rank 0 writes checkpoint.pth and the workers exit with code 75 (EX_TEMPFAIL, "checkpoint written, run
# again"). The trap then requeues the job; the requeued job runs the same command and resumes from
# --output-dir. torchrun gives workers 30 s after forwarding a signal: enough for one step + one save.
# Exit codes of pretrain.main: 0 done, 75 preempted (requeue), 3 non-finite loss (do not requeue), 2 bad config.
# The arguments go to pretrain.main unchanged: the configs/pretrain/ files set the original's global batch
# of 512 whatever the node and GPU count (nodes x GPUS_PER_NODE must divide it).
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
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

requeue() {
  echo "SIGUSR1: asking the trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  kill -TERM "$SRUN_PID" 2>/dev/null
  wait "$SRUN_PID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m pretrain.main "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=$?
# torchrun reports any worker failure (75 included) as its own exit 1, so requeueing is the trap's job.
# torchrun --max-restarts=N would restart the workers after ANY non-zero exit, 2 (bad config) and 3
# (non-finite loss) included, which only fail again: 0 by default; MAX_RESTARTS=N for flaky nodes
# (restarted workers resume from the checkpoint by themselves).
exit "$STATUS"
