"""The objective, masking, one-pass student and schedule against the spec's formulas (§1.4, §1.5, §1.7)."""

import math
import os

import pytest
import torch
import torch.nn as nn

from common import optim
from tests.pretrain.helpers import tiny_distiller  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"


def test_lr_schedule_per_iteration():
    base, total, warm, min_lr, warm_lr = 1e-3, 1000, 100, 1e-5, 1e-6
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base)
    sched = optim.build_cosine_schedule(opt, total, warm, min_lr, warm_lr)
    expected = {0: warm_lr, 50: warm_lr + 50 * (base - warm_lr) / warm,
                100: min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * 100 / total)),
                500: min_lr + 0.5 * (base - min_lr), 999: min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * 0.999))}
    for step, lr in expected.items():
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9), step
        assert optim.cosine_lr_at(step, base, total, warm, min_lr, warm_lr) == pytest.approx(lr, rel=1e-9)
    assert optim.scaled_lr(5e-4, 128 * 4) == pytest.approx(5e-4)  # the original's 128 x 4 GPUs


def test_weight_decay_groups():
    d = tiny_distiller()
    named = dict(d.named_parameters())

    def decayed(groups):
        ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        return {n for n, p in named.items() if id(p) in ids}

    default = decayed(optim.param_groups(d, 0.05))
    assert "student.blocks.0.attn.qkv.weight" in default and "heads.t.token.1.weight" in default
    assert not {n for n in default if n.endswith(".bias") or "norm" in n or "gamma" in n}
    assert {"student.pos_embed", "student.cls_token", "student.mask_token"} <= default  # original behaviour
    assert not {"student.pos_embed", "student.cls_token", "student.mask_token"} & decayed(
        optim.param_groups(d, 0.05, decay_tokens=False))
