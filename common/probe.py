"""The frozen-feature engine shared by `linear_eval/` and `fine_grained/`.

Three pieces, each usable alone:
- backbone + features: `build_frozen_backbone` (one loading path, with size overrides for tiny test
  models), `frozen_features` (one forward giving the last-n CLS tokens and the mean patch token) and
  `extract_features` (the same over a loader, distributed-aware);
- the DINOv2 linear-probe grid: `LinearHeadGrid` (n_last_blocks x avgpool x lr heads trained at once on
  the same features), `build_grid_optimizer`, `evaluate_grid`, plus `knn_classify`;
- logistic regression: full-batch L-BFGS multinomial (or per-class binary) L2 logistic regression in
  PyTorch with sklearn's objective, z-scoring and the C sweep (`sweep_logreg`).
"""
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from common import dist
from common.checkpoint import atomic_save, file_sha256
from common.errors import CheckpointError, ConfigError, DataError, MissingFileError, UserError

log = logging.getLogger(__name__)

# DINOv2's 13 base learning rates (scaled by global batch / 256) and the grid axes (spec §2.2).
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
# The fine-grained C sweep: wd in logspace(-6, 5, 45), C = 1 / wd (spec §3.2).
C_SWEEP = tuple(float(1.0 / wd) for wd in np.logspace(-6, 5, 45))


# ----------------------------------------------------------------------------------------------------
# Backbone and features
# ----------------------------------------------------------------------------------------------------

def build_frozen_backbone(pretrained: str | None, arch: str, patch_size: int = 14, img_size: int = 224,
                          model_kwargs: dict | None = None, ema: bool = False, seed: int = 0) -> nn.Module:
    """Load the evaluation backbone (eval mode, no grads) through `models.load_backbone`.

    `model_kwargs` (e.g. {"depth": 2, "embed_dim": 64, "num_heads": 2}, optionally "img_size") overrides
    the size of `arch`. Random init ("none") is seeded so its feature cache stays valid; the seeding runs
    on a forked RNG so the caller's own random stream (its --seed) is left untouched. A checkpoint that
    is missing, unreadable or of another architecture raises a UserError (MissingFileError /
    CheckpointError) saying so.
    """
    check_pretrained(pretrained)
    check_model_kwargs(arch, model_kwargs)
    kwargs = dict(model_kwargs or {})
    img_size = kwargs.pop("img_size", img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = models.load_backbone(pretrained, arch, patch_size=patch_size, img_size=img_size, ema=ema,
                                         **kwargs)
        except UserError:
            raise
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):
                raise
            raise ConfigError(f"--model-kwargs {model_kwargs}: {e}; use the ViT's size keys (depth, embed_dim, "
                              f"num_heads, img_size, ...)") from e
        except FileNotFoundError as e:  # models/ raising plain errors: they are the user's, say so
            raise MissingFileError(str(e)) from e
        except ValueError as e:
            if is_random_init(pretrained):
                raise ConfigError(f"cannot build {arch} (patch {patch_size}, {img_size} px, model kwargs "
                                  f"{model_kwargs or {}}): {e}") from e
            raise CheckpointError(f"--pretrained {pretrained} cannot be used as {arch} (patch {patch_size}"
                                  f"{', EMA' if ema else ''}): {e}") from e
    model.requires_grad_(False)
    return model.eval()


def check_model_kwargs(arch: str, model_kwargs) -> None:
    """--model-kwargs must be a JSON object whose sizes build a ViT (positive, width divisible by heads)."""
    if arch not in models.VIT_SIZES:
        raise ConfigError(f"unknown --arch {arch!r}; expected one of {sorted(models.VIT_SIZES)}")
    if model_kwargs is None:
        return
    if not isinstance(model_kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}', got {model_kwargs!r}")
    dim, depth, heads = models.VIT_SIZES[arch]
    sizes = {"embed_dim": dim, "depth": depth, "num_heads": heads, **model_kwargs}
    for key in ("embed_dim", "depth", "num_heads", "img_size"):
        value = sizes.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--model-kwargs {key} must be a positive integer, got {value!r}")
    if sizes["embed_dim"] % sizes["num_heads"]:
        raise ConfigError(f"--model-kwargs: embed_dim {sizes['embed_dim']} is not divisible by num_heads "
                          f"{sizes['num_heads']}")


def is_random_init(pretrained: str | None) -> bool:
    return pretrained in (None, "", "none")


def check_pretrained(pretrained: str | None) -> None:
    """Fail fast (before data or hashing) when --pretrained names no file."""
    if not is_random_init(pretrained) and not os.path.isfile(pretrained):
        raise MissingFileError(f"--pretrained {pretrained}: no such file; pass a checkpoint written by "
                               f"pretrain.main (checkpoint.pth / student_backbone.pth), an official DINOv2 "
                               f"file, or 'none' for the random-init baseline")


def backbone_identity(pretrained: str | None, arch: str, patch_size: int, model_kwargs: dict | None,
                      ema: bool = False, seed: int = 0, img_size: int | None = None) -> dict:
    """Everything that decides the backbone's features: the weights' content hash (not their path, so a
    moved file still matches) and the build (arch, patch, EMA, size overrides, input size)."""
    weights = f"random-init-seed{seed}" if is_random_init(pretrained) else file_sha256(pretrained)
    return {"weights": weights, "arch": arch, "patch": patch_size, "ema": bool(ema),
            "kwargs": model_kwargs or {}, "img_size": img_size}


def backbone_fingerprint(*args, **kwargs) -> str:
    """`backbone_identity` as one stable string (feature-cache keys)."""
    return json.dumps(backbone_identity(*args, **kwargs), sort_keys=True)


def cache_key(*parts) -> str:
    """Short stable hash of any JSON-able parts (backbone fingerprint, dataset, root, transform, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def frozen_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int = 4):
    """One forward pass of the frozen backbone.

    Returns cls (B, n, D): the CLS token after the final norm of each of the last n blocks (last block
    at index -1), and patch_mean (B, D): the mean of the last block's normed patch tokens.
    """
    depth = len(model.blocks)
    if n_last_blocks > depth:
        raise ConfigError(f"{n_last_blocks} last blocks requested from a {depth}-block backbone; "
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
                     autocast_dtype: torch.dtype | None = None, log_every: int = 50) -> dict:
    """Frozen features of a whole dataset, in dataset order, on every rank.

    The loader's dataset must return (image, target, index) (see `IndexedDataset`); under torchrun each
    rank extracts its shard and the shards are all-gathered, then sorted by index (duplicates added by
    DistributedSampler's padding are dropped). Returns dict(cls (N, n, D), patch_mean (N, D),
    targets (N,) or (N, K)) as float32 / int64 CPU tensors.
    """
    model = model.to(device)
    parts = {"cls": [], "patch_mean": [], "targets": [], "index": []}
    for step, (images, targets, index) in enumerate(loader):
        with autocast(device, autocast_dtype):
            cls, patch_mean = frozen_features(model, images.to(device, non_blocking=True), n_last_blocks)
        for k, v in zip(parts, (cls, patch_mean, targets, index)):
            parts[k].append(v.to(device))
        if log_every and step % log_every == 0:
            log.info("features: batch %d / %d", step, len(loader))
    out = {k: torch.cat(v) for k, v in parts.items()}
    if dist.get_world_size() > 1:
        out = {k: _all_gather_cat(v) for k, v in out.items()}
    order = _unique_order(out.pop("index"))
    return {k: v[order].cpu() for k, v in out.items()}


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


# ----------------------------------------------------------------------------------------------------
# The linear-probe grid (DINOv2 protocol)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadConfig:
    n_last: int
    avgpool: bool
    lr: float  # base lr, before the batch / 256 scaling

    @property
    def name(self) -> str:
        return f"blocks{self.n_last}_avgpool{int(self.avgpool)}_lr{self.lr:.0e}"


class LinearHeadGrid(nn.Module):
    """All (n_last, avgpool, lr) heads; each a Linear(n*D (+D) -> num_classes), weight N(0, 0.01), bias 0."""

    def __init__(self, embed_dim: int, num_classes: int, n_last_blocks=(1, 4), avgpool=(False, True),
                 lrs=DEFAULT_LRS):
        super().__init__()
        self.configs = [HeadConfig(n, a, lr) for n in n_last_blocks for a in avgpool for lr in lrs]
        self.heads = nn.ModuleDict()
        for c in self.configs:
            head = nn.Linear(embed_dim * (c.n_last + int(c.avgpool)), num_classes)
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads[c.name] = head
        self.max_blocks = max(n_last_blocks)

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> dict:
        """cls (B, n_max, D), patch_mean (B, D) -> {head name: logits (B, num_classes)}."""
        inputs = {}  # the 4 distinct inputs are shared by the 13 lrs each
        out = {}
        for c in self.configs:
            key = (c.n_last, c.avgpool)
            if key not in inputs:
                inputs[key] = head_input(cls, patch_mean, c.n_last, c.avgpool)
            out[c.name] = self.heads[c.name](inputs[key])
        return out


def build_grid_optimizer(grid: LinearHeadGrid, global_batch: int, max_iter: int):
    """SGD (momentum 0.9, no wd), one param group per head at lr * global_batch / 256, cosine to 0 per iter."""
    groups = [{"params": list(grid.heads[c.name].parameters()), "lr": c.lr * global_batch / 256.0}
              for c in grid.configs]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_iter, eta_min=0)
    return opt, sched


def grid_loss(logits: dict, targets: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the cross-entropy: heads are independent, so each gets its own gradient."""
    return sum(F.cross_entropy(v, targets) for v in logits.values())


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is within the top-k logits, for each k (k clipped to #classes)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = pred.eq(targets.unsqueeze(1))
    return [int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate_grid(backbone: nn.Module, grid: nn.Module, loader, device, autocast_dtype=None,
                  class_subset: torch.Tensor | None = None) -> dict:
    """Top-1/top-5 (%) of every head on `loader`, summed over ranks.

    class_subset (S,) restricts the logits to S of the classes and the loader's targets index that
    subset (ImageNet-A/-R: 200 of the 1000 classes).
    """
    grid.eval()
    counts = None
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        with autocast(device, autocast_dtype):
            cls, patch_mean = frozen_features(backbone, images, max_blocks(grid))
        logits = grid(cls, patch_mean)
        batch = torch.tensor([[*topk_correct(v if class_subset is None else v[:, class_subset], targets), len(targets)]
                              for v in logits.values()], dtype=torch.float64, device=device)  # (H, 3)
        counts = batch if counts is None else counts + batch
    if counts is None:
        raise DataError("the evaluation set is empty (no readable images): check the val / selection root")
    if dist.get_world_size() > 1:
        counts = dist.all_reduce_mean(counts) * dist.get_world_size()  # sum over ranks
    names = list(unwrap(grid).heads.keys())
    return {n: {"top1": 100.0 * float(c[0] / c[2]), "top5": 100.0 * float(c[1] / c[2])} for n, c in zip(names, counts)}


def unwrap(grid: nn.Module) -> LinearHeadGrid:
    return grid.module if hasattr(grid, "module") else grid  # DDP-wrapped or not


def max_blocks(grid: nn.Module) -> int:
    return unwrap(grid).max_blocks


# ----------------------------------------------------------------------------------------------------
# kNN (DINO): cosine similarity, k nearest neighbours weighted by exp(sim / T)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Class scores (N_test, C) of DINO's weighted kNN vote; features are L2-normalised here."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T  # (b, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


# ----------------------------------------------------------------------------------------------------
# Logistic regression: sklearn's objective, full-batch L-BFGS in PyTorch
# ----------------------------------------------------------------------------------------------------

def zscore(fit: torch.Tensor, *others: torch.Tensor):
    """Standardise every feature dimension with the mean/std of `fit`; returns (fit, *others) transformed."""
    mean = fit.mean(dim=0, keepdim=True)
    std = fit.std(dim=0, keepdim=True).clamp_min(1e-8)  # constant dimensions stay 0 instead of NaN
    return tuple((t - mean) / std for t in (fit, *others))


@dataclass
class LogReg:
    """Linear classifier (K, D) + (K,); multilabel = K independent binary problems (VOC)."""
    weight: torch.Tensor
    bias: torch.Tensor
    multilabel: bool
    iterations: int = 0

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias  # (N, K)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, C: float, num_classes: int, init: LogReg | None = None,
               max_iter: int = 1000, tol: float = 1e-4) -> LogReg:
    """L2-regularised logistic regression with scikit-learn's objective, by full-batch L-BFGS.

    sklearn minimises C * sum_i loss_i + ||W||^2 / 2 (bias unpenalised); we minimise the same divided
    by C * N (mean loss + ||W||^2 / (2 C N)) so gradients stay O(1) across the sweep in float32.
    x (N, D) float; y (N,) int64 class ids (softmax / multinomial) or (N, K) {0,1} (one binary problem
    per column, solved jointly: the sum of separable convex objectives has the same minimiser).
    `init` warm-starts from a neighbouring C's solution. `tol` bounds the largest gradient entry.
    """
    multilabel = y.dim() == 2
    x = x.float()
    n, d = x.shape
    w = torch.zeros(num_classes, d, device=x.device) if init is None else init.weight.detach().clone()
    b = torch.zeros(num_classes, device=x.device) if init is None else init.bias.detach().clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = y.to(x.device)
    y_float = y.float() if multilabel else None
    l2 = 1.0 / (C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-10, history_size=10,
                            line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        opt.zero_grad(set_to_none=False)
        logits = torch.addmm(b, x, w.T)  # (N, K)
        if multilabel:
            data = F.binary_cross_entropy_with_logits(logits, y_float, reduction="sum") / n
        else:
            data = F.cross_entropy(logits, y)
        loss = data + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        evals[0] += 1
        return loss

    with _few_threads(x.device, n * d * num_classes):
        opt.step(closure)
    iters = opt.state[opt._params[0]].get("n_iter", 0) if opt.state else 0
    return LogReg(w.detach(), b.detach(), multilabel, int(iters))


@contextlib.contextmanager
def _few_threads(device: torch.device, work: int, small: int = 4_000_000):
    """One CPU thread for small problems: thread start/sync per op costs more than the tiny matmuls,
    and with oversubscribed cores (other jobs running) intra-op threads can slow a fit down 50x."""
    if device.type != "cpu" or work >= small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class SweepResult:
    best_C: float
    val_scores: list  # one per C, in C_SWEEP order
    test_score: float
    model: LogReg


def sweep_logreg(train: tuple, val: tuple, trainval: tuple, test: tuple, metric, num_classes: int,
                 cs=C_SWEEP, device: torch.device | str = "cpu", max_iter: int = 1000,
                 tol: float = 1e-4) -> SweepResult:
    """The fine-grained protocol: z-score, pick C on val, refit on train+val, score on test.

    Each argument is (features (N, D), targets); `metric(scores (N, K), targets) -> float` (higher is
    better). Fits run from the most to the least regularised C, each warm-started from the previous
    (the solutions move smoothly with C, and strongly regularised problems converge in a few steps).
    Ties keep the first C in `cs` order (large C first), as the original's strict '>' did.
    """
    xtr, xva = zscore(train[0].to(device), val[0].to(device))
    ytr = train[1].to(device)
    order = np.argsort(cs)  # ascending C = descending regularisation
    scores = [None] * len(cs)
    prev = None
    for i in order:
        prev = fit_logreg(xtr, ytr, cs[i], num_classes, init=prev, max_iter=max_iter, tol=tol)
        scores[i] = float(metric(prev.decision_function(xva).cpu(), val[1]))
        log.info("C=%.3g val=%.2f (%d iterations)", cs[i], scores[i], prev.iterations)
    best = max(range(len(cs)), key=lambda i: (scores[i], -i))  # first index among the maxima
    xtv, xte = zscore(trainval[0].to(device), test[0].to(device))
    final = fit_logreg(xtv, trainval[1].to(device), cs[best], num_classes, max_iter=max_iter, tol=tol)
    test_score = float(metric(final.decision_function(xte).cpu(), test[1]))
    return SweepResult(cs[best], scores, test_score, final)


def save_features(path: str, feats: dict) -> None:
    """Feature caches are plain tensors, written atomically (a killed run never leaves half a cache)."""
    atomic_save(feats, path)
