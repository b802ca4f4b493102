"""Training and evaluation loops of the linear probe (the grid itself lives in linear_eval/grid.py)."""
import logging

import torch

from common import dist, probe
from common.checkpoint import save_with_history
from common.config import config_drift
from common.errors import ConfigError, DataError
from linear_eval.grid import grid_loss, max_blocks, topk_correct, unwrap

log = logging.getLogger(__name__)


def train_grid(backbone, grid, opt, sched, loader, device, start_iter: int, max_iter: int, eval_fn, save_fn,
               eval_period: int, ckpt_period: int, autocast_dtype=None, metric_logger=None, log_every: int = 20):
    """Run iterations start_iter..max_iter of SGD on all heads; evaluate / checkpoint periodically.

    `loader` is infinite (ResumableSampler) and yields collated (images, targets) or None when every
    image of a batch was unreadable. eval_fn(it) -> dict is called every eval_period iterations and at
    the end; save_fn(it) every ckpt_period iterations and at the end. A progress line (the loss averaged
    over the iterations since the last line, img/s, ETA) goes to the log and to `metric_logger` every
    `log_every` iterations, every few seconds and at the end.
    """
    it, history = start_iter, []
    progress = probe.Progress("it", max_iter, start=start_iter, every=log_every)
    window = LossWindow(device)
    data = iter(loader)
    while it < max_iter:
        batch = next(data)
        n_images = 0
        if batch is not None:
            images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with torch.no_grad(), probe.autocast(device, autocast_dtype):
                cls, patch_mean = probe.frozen_features(backbone, images, max_blocks(grid))  # (B,n,D), (B,Dp)
            grid.train()
            loss = grid_loss(grid(cls, patch_mean), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.add(loss.detach())
            n_images = len(images) * dist.get_world_size()
        sched.step()  # per iteration, even for a skipped batch, so the schedule length is fixed
        it += 1
        if progress.update(n_images):
            log_progress(progress, window.mean(), opt, metric_logger)
        with progress.paused():  # img/s and ETA of the training iterations alone
            if it % eval_period == 0 or it == max_iter:
                history.append({"iteration": it, **eval_fn(it)})
            if it % ckpt_period == 0 or it == max_iter:
                save_fn(it, history)
    return history


class LossWindow:
    """Sum of the losses since the last progress line, kept on the device (no sync per iteration)."""

    def __init__(self, device):
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1

    def mean(self) -> float:
        """The mean since the last call (NaN when every batch of the window was unreadable), then reset."""
        value = self.total.item() / self.count if self.count else float("nan")
        self.total.zero_()
        self.count = 0
        return value


def log_progress(progress, loss: float, opt, metric_logger) -> None:
    lr_max = max(g["lr"] for g in opt.param_groups)
    log.info("%s  loss (sum over heads, mean of the window) %.4f  lr max %.3g", progress.line, loss, lr_max)
    if metric_logger:
        metric_logger.log(progress.done, prefix="train/", loss=loss, lr_max=lr_max, img_per_s=progress.img_per_s)


def best_head(scores: dict) -> str:
    """Name of the head with the highest top-1 (first in grid order on ties)."""
    return max(scores, key=lambda name: scores[name]["top1"])


def save_state(output_dir: str, grid, opt, sched, it: int, history: list, meta: dict) -> None:
    """Rank 0 writes {heads, optimizer, scheduler, iteration, eval history, run meta, RNG} atomically.

    With the sampler restarting at the saved position and the RNG restored, a resumed run with
    num_workers=0 trains exactly as the uninterrupted one (workers are re-seeded from that RNG).
    """
    if dist.is_main_process():
        state = {"grid": unwrap(grid).state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "iteration": it, "history": history, "meta": meta,
                 # the augmentations draw from this RNG (in the main process when num_workers = 0)
                 "rng": torch.get_rng_state()}
        save_with_history(state, output_dir)
    dist.barrier()


# What a resumed run must share with the checkpoint's run: the heads and their schedule are only valid for
# the same backbone (by content, EMA flag, arch, size overrides, patch and image size) and the same grid.
RESUME_KEYS = ("backbone", "arch", "num_classes", "lrs", "n_last_blocks", "global_batch", "max_iter")


def check_meta(saved: dict, meta: dict, path: str = "the output dir") -> None:
    """Refuse (ConfigError listing every difference) to resume a checkpoint made with another set-up."""
    diffs = []
    for key, (old, new) in config_drift(saved, meta, RESUME_KEYS).items():
        if key == "backbone" and isinstance(old, dict) and isinstance(new, dict):
            diffs += [f"backbone {k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        elif key == "backbone" and old is None:
            diffs.append("backbone: not recorded (checkpoint from an older linear_eval) -> "
                         f"{meta.get('pretrained')}")
        else:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    if diffs:
        if saved.get("pretrained") != meta.get("pretrained"):
            diffs.append(f"(--pretrained {saved.get('pretrained')!r} -> {meta.get('pretrained')!r})")
        raise ConfigError(f"{path} was made by a different run; resuming it would mix two set-ups: "
                          f"{'; '.join(diffs)}. Rerun with that run's flags to resume it, or pass a new "
                          f"--output-dir")


def _short(value):
    """Content hashes shortened for the message."""
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def restore_state(state: dict, grid, opt, sched, meta: dict) -> int:
    """Load a checkpoint written by save_state; refuse one from a different run set-up."""
    check_meta(state["meta"], meta)
    unwrap(grid).load_state_dict(state["grid"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["iteration"])


@torch.no_grad()
def evaluate_grid(backbone, grid, loader, device, autocast_dtype=None, class_subset: torch.Tensor | None = None,
                  desc: str = "", log_every: int = 50) -> dict:
    """Top-1/top-5 (%) of every head on `loader`, summed over ranks (progress lines named `desc`).

    class_subset (S,) restricts the logits to S of the classes and the loader's targets index that
    subset (ImageNet-A/-R: 200 of the 1000 classes).
    """
    grid.eval()
    counts = None
    progress = probe.Progress(f"eval {desc}", len(loader), every=log_every)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        with probe.autocast(device, autocast_dtype):
            cls, patch_mean = probe.frozen_features(backbone, images, max_blocks(grid))
        logits = grid(cls, patch_mean)
        batch = torch.tensor([[*topk_correct(v if class_subset is None else v[:, class_subset], targets), len(targets)]
                              for v in logits.values()], dtype=torch.float64, device=device)  # (H, 3)
        counts = batch if counts is None else counts + batch
        if progress.update(len(images) * dist.get_world_size()):
            log.info("%s", progress.line)
    if counts is None:
        raise DataError("the evaluation set is empty (no readable images): check the val / selection root")
    if dist.get_world_size() > 1:
        counts = dist.all_reduce_mean(counts) * dist.get_world_size()  # sum over ranks
    names = list(unwrap(grid).heads.keys())
    return {n: {"top1": 100.0 * float(c[0] / c[2]), "top5": 100.0 * float(c[1] / c[2])} for n, c in zip(names, counts)}
