"""Frozen-feature extraction shared by `linear_eval/` and `fine_grained/`.

- the backbone: `build_frozen_backbone` (one loading path, with size overrides for tiny test models), the
  flag checks run before any work (`check_model_kwargs`, `check_pretrained`) and `backbone_identity` (what
  decides the features: resume checks and feature-cache keys);
- the features: `frozen_features` (one forward giving the last-n CLS tokens and the mean patch token),
  `head_input` (DINOv2's linear input built from them) and `extract_features` (the same over a loader,
  gathered over ranks, in dataset order);
- progress: `Progress` (img/s and ETA lines), for feature extraction and the linear probe's loops.

The linear-probe grid and kNN live in `linear_eval/`, logistic regression and the feature cache in
`fine_grained/`.
"""
import contextlib
import logging
import os
import time

import torch
import torch.nn as nn

import models
from common import dist
from common.checkpoint import file_fingerprint
from common.errors import CheckpointError, ConfigError, DataError, MissingFileError, UserError

log = logging.getLogger(__name__)


def build_frozen_backbone(pretrained: str | None, arch: str, patch_size: int = 14, img_size: int = 224,
                          model_kwargs: dict | None = None, ema: bool = False, seed: int = 0,
                          student: str | None = None) -> nn.Module:
    """Load the evaluation backbone (eval mode, no grads): a DINOv2 ViT through `models.load_backbone`, or
    `timm:<name>` through `models.load_backbone` (a `models.TimmStudent`).

    `model_kwargs` (e.g. {"depth": 2, "embed_dim": 64, "num_heads": 2}, optionally "img_size") overrides
    the size of `arch`; for timm archs they go to `timm.create_model`. `student`: the key of one student in a
    several-student pretrain checkpoint.pth (common.backbone_flags resolves it from --student). Random init ("none") is seeded so
    its feature cache stays valid; the seeding runs on a forked RNG so the caller's own random stream (its
    --seed) is left untouched. A checkpoint that is missing, unreadable or of another architecture raises
    a UserError (MissingFileError / CheckpointError) saying so.
    """
    check_pretrained(pretrained)
    check_model_kwargs(arch, model_kwargs)
    kwargs = dict(model_kwargs or {})
    img_size = kwargs.pop("img_size", img_size)
    timm_arch = models.is_timm_name(arch)
    patch = "" if timm_arch else f", patch {patch_size}"  # timm models have no patch-size flag
    build = f"{arch} ({img_size} px{patch}{', EMA' if ema else ''})"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = models.load_backbone(pretrained, arch, patch_size=patch_size, img_size=img_size, ema=ema,
                                         student=student, **kwargs)
        except UserError:
            raise
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):
                raise
            keys = ("timm.create_model's keywords" if timm_arch
                    else "the ViT's size keys (depth, embed_dim, num_heads, img_size, ...)")
            raise ConfigError(f"--model-kwargs {model_kwargs}: {e}; use {keys}") from e
        except FileNotFoundError as e:  # models/ raising plain errors: they are the user's, say so
            raise MissingFileError(str(e)) from e
        except ValueError as e:
            if is_random_init(pretrained):
                raise ConfigError(f"cannot build {build} with model kwargs {model_kwargs or {}}: {e}") from e
            raise CheckpointError(f"--pretrained {pretrained} cannot be used as {build}: {e}") from e
    model.requires_grad_(False)
    return model.eval()


def check_model_kwargs(arch: str, model_kwargs) -> None:
    """--arch must name a ViT size or a timm model; --model-kwargs must be a JSON object, and for a ViT its
    sizes must build one (positive, width divisible by heads)."""
    if models.is_timm_name(arch):
        _check_timm_arch(arch)
    elif arch not in models.VIT_SIZES:
        raise ConfigError(f"unknown --arch {arch!r}; expected one of {sorted(models.VIT_SIZES)} or timm:<name> "
                          f"(a timm model, e.g. timm:convnext_tiny)")
    if model_kwargs is None:
        return
    if not isinstance(model_kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}', got {model_kwargs!r}")
    if models.is_timm_name(arch):
        return  # timm.create_model checks its own keywords (a TypeError becomes a ConfigError at build)
    dim, depth, heads = models.VIT_SIZES[arch]
    sizes = {"embed_dim": dim, "depth": depth, "num_heads": heads, **model_kwargs}
    for key in ("embed_dim", "depth", "num_heads", "img_size"):
        value = sizes.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--model-kwargs {key} must be a positive integer, got {value!r}")
    if sizes["embed_dim"] % sizes["num_heads"]:
        raise ConfigError(f"--model-kwargs: embed_dim {sizes['embed_dim']} is not divisible by num_heads "
                          f"{sizes['num_heads']}")


def _check_timm_arch(arch: str) -> None:
    import timm

    name = arch.split(":", 1)[1]
    if not timm.is_model(name):
        raise ConfigError(f"--arch {arch}: timm has no model {name!r}; use the name given to pretrain.main "
                          f"--student (timm.list_models() lists them)")


def backbone_img_size(arch: str, image_size: int) -> int:
    """The size the backbone is built at: 224 for our ViTs (their position embedding is resampled to any
    input), the input size itself for timm models (timm ViTs fix it when built; CNNs ignore it)."""
    return image_size if models.is_timm_name(arch) else 224


def is_random_init(pretrained: str | None) -> bool:
    return pretrained in (None, "", "none")


def check_pretrained(pretrained: str | None) -> None:
    """Fail fast (before data or hashing) when --pretrained names no file."""
    if not is_random_init(pretrained) and not os.path.isfile(pretrained):
        raise MissingFileError(f"--pretrained {pretrained}: no such file; pass a checkpoint written by "
                               f"pretrain.main (checkpoint.pth / student_backbone.pth), an official DINOv2 "
                               f"file, or 'none' for the random-init baseline")


def backbone_identity(pretrained: str | None, arch: str, patch_size: int, model_kwargs: dict | None,
                      ema: bool = False, seed: int = 0, img_size: int | None = None, student: str | None = None) -> dict:
    """Everything that decides the backbone's features: the weights' content hash (not their path, so a
    moved file still matches) and the build (arch, patch, EMA, size overrides, input size; the student's key
    when the file holds several)."""
    weights = f"random-init-seed{seed}" if is_random_init(pretrained) else file_fingerprint(pretrained)
    identity = {"weights": weights, "arch": arch, "patch": patch_size, "ema": bool(ema),
                "kwargs": model_kwargs or {}, "img_size": img_size}
    return {**identity, "student": student} if student else identity


def frozen_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int = 4):
    """One forward pass of the frozen backbone.

    Returns cls (B, n, D): the CLS token after the final norm of each of the last n blocks (last block
    at index -1), and patch_mean (B, Dp): the mean of the last block's normed patch tokens (Dp = D for
    ViTs). A timm backbone has n = 1: cls is its pooled pre-logits feature, patch_mean the mean of its
    final feature map.
    """
    if isinstance(model, models.TimmStudent):
        if n_last_blocks != 1:
            raise ConfigError(f"{n_last_blocks} last blocks requested from timm:{model.timm_name}, which gives only "
                              f"its final features (timm stages differ in width); use 1 (linear_eval: "
                              f"--n-last-blocks 1; fine_grained: drop --multiple)")
    elif n_last_blocks > len(model.blocks):
        raise ConfigError(f"{n_last_blocks} last blocks requested from a {len(model.blocks)}-block backbone; "
                          f"use a deeper model or fewer blocks (fine_grained: drop --multiple)")
    outs = model.get_intermediate_layers(images, n=n_last_blocks, return_class_token=True, norm=True)
    cls = torch.stack([c for _, c in outs], dim=1)  # (B, n, D)
    patch_mean = outs[-1][0].mean(dim=1)  # (B, D)
    return cls.float(), patch_mean.float()


def head_input(cls: torch.Tensor, patch_mean: torch.Tensor, n_last: int, avgpool: bool) -> torch.Tensor:
    """DINOv2's linear input: the last n CLS tokens concatenated (+ the mean patch token): (B, n*D (+D))."""
    x = cls[:, -n_last:].flatten(1)
    return torch.cat([x, patch_mean], dim=1) if avgpool else x


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device, n_last_blocks: int = 1,
                     autocast_dtype: torch.dtype | None = None, log_every: int = 50, desc: str = "features") -> dict:
    """Frozen features of a whole dataset, in dataset order, on every rank.

    The loader's dataset must return (image, target, index) (see `IndexedDataset`); under torchrun each
    rank extracts its shard and the shards are all-gathered, then sorted by index (duplicates added by
    DistributedSampler's padding are dropped). Returns dict(cls (N, n, D), patch_mean (N, Dp),
    targets (N,) or (N, K)) as float32 / int64 CPU tensors. A `desc` progress line with img/s (all ranks)
    and ETA is logged every `log_every` batches or PROGRESS_SECONDS (0: none).
    """
    model = model.to(device)
    parts = {"cls": [], "patch_mean": [], "targets": [], "index": []}
    progress = Progress(desc, len(loader), every=log_every)
    for images, targets, index in loader:
        with autocast(device, autocast_dtype):
            cls, patch_mean = frozen_features(model, images.to(device, non_blocking=True), n_last_blocks)
        for k, v in zip(parts, (cls, patch_mean, targets, index)):
            parts[k].append(v.to(device))
        if progress.update(len(images) * dist.get_world_size()) and log_every:
            log.info("%s", progress.line)
    out = {k: torch.cat(v) for k, v in parts.items()}
    if dist.get_world_size() > 1:
        out = {k: _all_gather_cat(v) for k, v in out.items()}
    order = _unique_order(out.pop("index"))
    return {k: v[order].cpu() for k, v in out.items()}


# A progress line at least this often (seconds), however slow the batches: a long pass never looks hung.
PROGRESS_SECONDS = 10.0


class Progress:
    """Progress of a loop over batches: img/s over the window since the last line, and the ETA at that rate.

    `update(images)` counts one batch and returns True when a line is due: every `every` batches, after
    PROGRESS_SECONDS, and at the last batch. Then `line` ("<what> <done>/<total>  <img/s> img/s  eta
    h:mm:ss"), `img_per_s` and `eta_s` describe the window that just closed.
    """

    def __init__(self, what: str, total: int, start: int = 0, every: int = 50, seconds: float | None = None,
                 clock=time.perf_counter):
        self.what, self.total, self.done = what, total, start
        self.every, self.seconds = max(every, 1), PROGRESS_SECONDS if seconds is None else seconds
        self.clock = clock
        self.t_last, self.images, self.steps = clock(), 0, 0
        self.img_per_s = self.eta_s = 0.0
        self.line = ""

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) counts neither in img/s nor in the ETA."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.t_last += self.clock() - t0

    def update(self, images: int, due: bool | None = None) -> bool:
        """Count one batch of `images`; `due` overrides the cadence (a caller that logs on its own steps)."""
        self.done, self.images, self.steps = self.done + 1, self.images + images, self.steps + 1
        now = self.clock()
        if due is None:
            due = self.steps >= self.every or now - self.t_last >= self.seconds or self.done >= self.total
        if not due:
            return False
        dt = max(now - self.t_last, 1e-9)
        self.img_per_s, self.eta_s = self.images / dt, max(self.total - self.done, 0) * dt / self.steps
        self.line = f"{self.what} {self.done}/{self.total}  {self.img_per_s:.1f} img/s  eta {hms(self.eta_s)}"
        self.t_last, self.images, self.steps = now, 0, 0
        return True


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-length per-rank tensors (DistributedSampler pads every shard to the same size)."""
    chunks = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(chunks, t.contiguous())
    return torch.cat(chunks)


def _unique_order(index: torch.Tensor) -> torch.Tensor:
    """Positions that sort `index` and keep the first copy of each value."""
    index = index.cpu()
    order = torch.argsort(index, stable=True)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    return order[keep]


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so items are (image, target, index): extraction can be re-ordered after gathering."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if item is None:  # SafeImageFolder's unreadable image: features must stay aligned with indices
            raise DataError(f"sample {i} of {type(self.dataset).__name__} is unreadable; remove or replace it")
        image, target = item
        return image, torch.as_tensor(target), i
