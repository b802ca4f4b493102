"""Gradient accumulation: a global batch larger than the GPUs hold, with the same update as one big batch.

    --global-batch-size G --batch-size B   on N processes: G / (B * N) micro-batches per optimizer step

What "the same update" means here (tested on CPU in fp32: tests/pretrain/test_accumulate.py):
- Data and augmentation: the loader yields the whole step batch of a process (G / N images), exactly as a
  run with --batch-size G/N would; the step splits it into micro-batches of B on the device. The images,
  their augmentation (seeded per sample by its place in the epoch) and the sampler position are therefore
  those of the one-batch run, and a resume (checkpoints are taken at optimizer-step boundaries only)
  replays the interrupted step's micro-batches from the same sampler position.
- Masks: drawn once per step for the whole step batch (the generator decides which share of the batch is
  masked, so it must see the batch), then sliced per micro-batch.
- Loss normalisation: every objective is a mean over the global batch (per-sample objectives over its
  images, masked objectives over its masked tokens). A micro-batch's objective is a mean over its own
  elements, so it enters the step's loss weighted by its share of those elements; the weighted sum is the
  one-batch mean, and so is its gradient (up to float summation order).
- DDP: gradients are all-reduced once per step (`no_sync` on every micro-batch but the last).
- The schedule, `global_step`, `--save-every-steps` and `--log-every` count optimizer steps.
Stochastic depth draws from a per-step stream that each micro-batch continues under its own seed, so with
--drop-path > 0 the update has the same distribution as one batch's, not the same draws.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from common.errors import ConfigError

DEFAULT_BATCH_SIZE = 128  # per process without --global-batch-size (the original: 128 x 4 GPUs)
MIN_LR_AT_REFERENCE = 1e-5  # the default --min-lr at --lr-reference-batch; scaled with the global batch like --lr


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is made: `micro` images per forward, `accum` forwards per optimizer step and process."""
    micro: int  # --batch-size (resolved): images per process per forward/backward
    accum: int  # micro-batches per optimizer step
    world_size: int

    @property
    def per_process(self) -> int:
        """Images per process per optimizer step: the loader's batch."""
        return self.micro * self.accum

    @property
    def global_batch(self) -> int:
        return self.per_process * self.world_size


def plan_batches(batch_size: int, global_batch_size: int, world_size: int) -> BatchPlan:
    """The batch plan of --batch-size / --global-batch-size on `world_size` processes (ConfigError with the fix).

    batch_size 0 (the default) means: the global batch split over the processes, no accumulation (128 per
    process without --global-batch-size). global_batch_size 0 means: batch_size x processes."""
    if global_batch_size < 0 or batch_size < 0:
        raise ConfigError(f"--batch-size and --global-batch-size must be >= 0 (0 = automatic), got {batch_size} "
                          f"and {global_batch_size}")
    if not global_batch_size:
        return BatchPlan(batch_size or DEFAULT_BATCH_SIZE, 1, world_size)
    if global_batch_size % world_size:
        raise ConfigError(f"--global-batch-size {global_batch_size} is not divisible by the {world_size} processes; "
                          f"use a multiple of {world_size}")
    per_process = global_batch_size // world_size
    if not batch_size:
        return BatchPlan(per_process, 1, world_size)
    if per_process % batch_size:
        fits = [d for d in range(min(batch_size, per_process), 0, -1) if per_process % d == 0][0]
        raise ConfigError(f"--global-batch-size {global_batch_size} on {world_size} process(es) is {per_process} "
                          f"images per process, not a multiple of --batch-size {batch_size}; use --batch-size "
                          f"{fits} ({per_process // fits} micro-batches per step) or a --global-batch-size that "
                          f"is a multiple of {batch_size * world_size}")
    return BatchPlan(batch_size, per_process // batch_size, world_size)


def default_min_lr(global_batch: int, reference_batch: int) -> float:
    """--min-lr's default: 1e-5 at the reference batch, scaled with the global batch as the lr is, so the cosine
    floor stays 1/50 of the peak lr at any batch size (the same 1e-5 at 512)."""
    return MIN_LR_AT_REFERENCE * global_batch / reference_batch


# ---- one step: micro-batches and their loss weights --------------------------------------------------------
@dataclass
class MicroBatch:
    images: torch.Tensor  # (b, 3, H, W)
    masks: torch.Tensor  # (b, N) bool
    rows: torch.Tensor  # (m,) its masked samples, indices into this micro-batch
    sample_share: float  # b / images of the step (this process)
    token_share: float  # masked tokens here / masked tokens of the step (0 when nothing is masked)
    index: int
    last: bool


def split_step(images: torch.Tensor, masks: torch.Tensor, rows: torch.Tensor, micro: int) -> list[MicroBatch]:
    """The step batch (and its masks, drawn for the whole batch) as micro-batches of `micro` images (the last one
    shorter if unreadable images were dropped from the batch)."""
    n = images.shape[0]
    bounds = list(range(0, n, micro))
    total_tokens = int(masks.sum())
    out = []
    for i, lo in enumerate(bounds):
        hi = min(lo + micro, n)
        own = rows[(rows >= lo) & (rows < hi)] - lo
        tokens = int(masks[lo:hi].sum())
        out.append(MicroBatch(images[lo:hi], masks[lo:hi], own, (hi - lo) / n,
                              tokens / total_tokens if total_tokens else 0.0, i, i == len(bounds) - 1))
    return out


def is_masked_objective(name: str) -> bool:
    """Whether objective `name` is a mean over the masked tokens (else over the samples)."""
    from . import losses

    return losses.OBJECTIVES[name].masked


def shares(distiller, mb: MicroBatch) -> dict:
    """{`teacher/objective`: the micro-batch's share of that objective's elements in the step}."""
    return {f"{t.key}/{o}": (mb.token_share if is_masked_objective(o) else mb.sample_share)
            for t in distiller.targets for o in t.objectives}


def weighted_total(distiller, losses: dict, mb: MicroBatch) -> torch.Tensor:
    """This micro-batch's part of the step loss: sum_t w_t sum_o lambda_o share_o L_o (the one-batch loss's sum
    over the step's micro-batches)."""
    share = shares(distiller, mb)
    total = 0
    for t in distiller.targets:
        part = sum(distiller.lambdas[o] * share[f"{t.key}/{o}"] * losses[f"{t.key}/{o}"] for o in t.objectives)
        total = total + (part if t.weight == 1.0 else t.weight * part)
    return total


def logged_losses(distiller, losses: dict, total: torch.Tensor, mb: MicroBatch) -> dict:
    """A micro-batch's detached losses (keys of `losses`), each weighted by its share: summed over the step's
    micro-batches they are the one-batch values (one micro-batch: the values themselves)."""
    share = shares(distiller, mb)
    return {k: (total if k == "loss" else v * share[k]).detach() for k, v in losses.items()}


def sync_gradients(model, mb: MicroBatch):
    """DDP all-reduces the gradients once per step: every micro-batch but the last runs under no_sync."""
    if mb.last or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def describe(plan: BatchPlan) -> str:
    if plan.accum == 1:
        return f"global batch {plan.global_batch} = {plan.micro} x {plan.world_size} process(es)"
    return (f"global batch {plan.global_batch} = {plan.micro} x {plan.accum} micro-batches x {plan.world_size} "
            f"process(es) (gradient accumulation: one optimizer step per {plan.accum} forward/backward passes)")

