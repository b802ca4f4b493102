"""The DINOv2 linear-probe grid: every (n_last_blocks, avgpool, lr) head trained at once on the same frozen
features, its optimizer and loss, and top-k counting (shared with kNN)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.probe import head_input

# DINOv2's 13 base learning rates (scaled by global batch / 256) and the grid axes.
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass(frozen=True)
class HeadConfig:
    n_last: int
    avgpool: bool
    lr: float  # base lr, before the batch / 256 scaling

    @property
    def name(self) -> str:
        return f"blocks{self.n_last}_avgpool{int(self.avgpool)}_lr{self.lr:.0e}"


class LinearHeadGrid(nn.Module):
    """All (n_last, avgpool, lr) heads; each a Linear(n*D (+Dp) -> num_classes), weight N(0, 0.01), bias 0.

    D is the CLS width, Dp the patch-token width (default D; timm models may differ, e.g. MobileNets).
    """

    def __init__(self, embed_dim: int, num_classes: int, n_last_blocks=(1, 4), avgpool=(False, True),
                 lrs=DEFAULT_LRS, patch_dim: int | None = None):
        super().__init__()
        patch_dim = embed_dim if patch_dim is None else patch_dim
        self.configs = [HeadConfig(n, a, lr) for n in n_last_blocks for a in avgpool for lr in lrs]
        self.heads = nn.ModuleDict()
        for c in self.configs:
            head = nn.Linear(embed_dim * c.n_last + patch_dim * int(c.avgpool), num_classes)
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads[c.name] = head
        self.max_blocks = max(n_last_blocks)

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> dict:
        """cls (B, n_max, D), patch_mean (B, Dp) -> {head name: logits (B, num_classes)}."""
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


def unwrap(grid: nn.Module) -> LinearHeadGrid:
    return grid.module if hasattr(grid, "module") else grid  # DDP-wrapped or not


def max_blocks(grid: nn.Module) -> int:
    return unwrap(grid).max_blocks
