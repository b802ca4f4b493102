"""Optimisation pieces shared by the training entry points: AdamW groups, warmup + cosine per iteration, EMA.

Everything here is a thin layer over timm / torch so the recipes stay the well-tested library ones:
- parameter groups: `timm.optim.param_groups_weight_decay` (no decay on 1-D parameters and biases);
- schedule: `timm.scheduler.CosineLRScheduler` driven per iteration (`step_update`), not per epoch;
- EMA: `timm.utils.ModelEmaV3` with a constant decay (the original's ModelEma v1 semantics).
"""
import math

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

# Learned tokens of the ViT. The original Proteus (timm 0.9 grouping, no `no_weight_decay()`) decays them
# because they are not 1-D; timm's / DeiT's own ViTs exclude them. Which one applies is a config choice.
TOKEN_PARAM_PATTERNS = ("*pos_embed", "*cls_token", "*mask_token", "*register_tokens")


def param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = True) -> list[dict]:
    """AdamW groups: no weight decay on 1-D params (norms, LayerScale) and biases.

    decay_tokens=True reproduces the original Proteus (pos/cls/mask tokens are decayed);
    False exempts them as well (timm/DeiT `no_weight_decay()` convention).
    """
    exclude = () if decay_tokens else TOKEN_PARAM_PATTERNS
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=exclude)


def build_adamw(groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """torch AdamW; `fused=None` picks the fused kernel on CUDA (one launch for all params) else foreach."""
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None,
                             foreach=None if fused else True)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 512) -> float:
    """DeiT's linear scaling rule: lr = base_lr * global_batch / reference_batch."""
    return base_lr * global_batch / reference_batch


def build_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                          min_lr: float, warmup_lr: float) -> CosineLRScheduler:
    """Linear warmup from warmup_lr, then cosine to min_lr, both counted in iterations.

    Like the original (timm, warmup_prefix=False) the cosine is evaluated on the raw step t, so for
    t >= warmup_steps: lr(t) = min_lr + 0.5 (lr - min_lr) (1 + cos(pi t / total_steps)).
    Call `.step_update(global_step)` before every optimizer step.
    """
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, warmup_prefix=False, t_in_epochs=False)


def cosine_lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float,
                 warmup_lr: float) -> float:
    """Closed form of `build_cosine_schedule` (documentation and tests)."""
    if step < warmup_steps:
        return warmup_lr + step * (base_lr - warmup_lr) / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * step / total_steps))


def build_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """Exponential moving average of `model` (constant decay per update; call `.update(model)`)."""
    ema = ModelEmaV3(model, decay=decay)
    ema.module.requires_grad_(False)
    return ema
