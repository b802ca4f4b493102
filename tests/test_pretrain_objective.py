"""The objective, masking, one-pass student and schedule against the spec's formulas (§1.4, §1.5, §1.7)."""
import math
import os

import pytest
import torch
import torch.nn as nn

import models
from common import optim
from pretrain.losses import ProteusDistiller, TargetSpec, select_objectives
from pretrain.masking import MaskGenerator, validate_mask_config

os.environ["HF_HUB_OFFLINE"] = "1"
B, DT = 6, 8  # batch, teacher width


def tiny_distiller(objectives=("token", "fea", "patch"), lambdas=None):
    torch.manual_seed(0)
    student = models.build_student("vit_tiny", patch_size=14, img_size=28, depth=2, embed_dim=16, num_heads=2)
    nn.init.normal_(student.mask_token, std=0.5)  # a non-zero mask token makes the masked view differ
    lambdas = lambdas or {"token": 1.0, "fea": 0.5, "patch": 2.0}
    return ProteusDistiller(student, [TargetSpec("t", DT, tuple(objectives))], lambdas, grid=(2, 2)).double()


def run(d, x, masks, rows, t_cls, t_patch):
    """The distiller's losses with the historical names (loss, loss_token, loss_fea, loss_patch)."""
    out = d(x, masks, rows, {"t": {"cls": t_cls, "patch": t_patch}})
    return {("loss" if k == "loss" else "loss_" + k.split("/")[1]): v for k, v in out.items()}


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 28, 28, generator=g, dtype=torch.float64)
    t_cls = torch.randn(B, DT, generator=g, dtype=torch.float64)
    t_patch = torch.randn(B, 4, DT, generator=g, dtype=torch.float64)
    masks = torch.zeros(B, 4, dtype=torch.bool)
    masks[1, [0, 2]] = True
    masks[4, [1, 2, 3]] = True
    rows = torch.tensor([1, 4])
    return x, masks, rows, t_cls, t_patch


def spec_reference(d: ProteusDistiller, x, masks, t_cls, t_patch, lambdas):
    """Spec §1.7 literally: a masked pass over *all* B samples, flat index list I, nn.MSELoss (mean)."""
    mse = nn.MSELoss()
    unmasked = d.student.forward_features(x)
    masked = d.student.forward_features(x, masks)
    s_cls, s_patch = unmasked["cls"], unmasked["patch"]
    I = masks.flatten().nonzero().squeeze(1)  # indices into the flattened (B*N) tokens, sample-major
    s_masked = masked["patch"].flatten(0, 1)[I]
    t_masked = t_patch.flatten(0, 1)[I]
    l_token = mse(d.heads['t']['token'](s_cls), t_cls)
    l_fea = mse(torch.cat([d.heads['t']['token'](s_cls)[:, None], d.heads['t']['fea'](s_patch)], 1), torch.cat([t_cls[:, None], t_patch], 1))
    l_patch = mse(d.heads['t']['patch'](s_masked), t_masked)
    total = lambdas["token"] * l_token + lambdas["fea"] * l_fea + lambdas["patch"] * l_patch
    return {"loss_token": l_token, "loss_fea": l_fea, "loss_patch": l_patch, "loss": total}


def test_objective_matches_spec_formulas():
    lambdas = {"token": 1.0, "fea": 0.5, "patch": 2.0}
    d = tiny_distiller(lambdas=lambdas)
    x, masks, rows, t_cls, t_patch = fixed_batch()
    got = run(d, x, masks, rows, t_cls, t_patch)
    ref = spec_reference(d, x, masks, t_cls, t_patch, lambdas)
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-10, atol=1e-12, msg=k)
    assert got["loss_patch"] > 0 and got["loss_fea"] != got["loss_token"]


def test_one_student_pass_equals_two_passes():
    d = tiny_distiller()
    x, masks, rows, _, _ = fixed_batch()
    s_cls, s_patch, s_masked = d.student_pass(x, masks, rows)  # one forward over B + M samples
    clean = d.student.forward_features(x)
    masked = d.student.forward_features(x[rows], masks[rows])
    torch.testing.assert_close(s_cls, clean["cls"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_patch, clean["patch"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_masked, masked["patch"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(s_masked, clean["patch"][rows])  # the mask token really changed the view


def test_nothing_masked_gives_finite_loss_and_gradients():
    d = tiny_distiller()
    x, _, _, t_cls, t_patch = fixed_batch()
    masks, rows = MaskGenerator(4, 0.0, [0.5])(B)  # mask probability 0: no masked sample
    assert rows.numel() == 0 and not masks.any()
    out = run(d, x, masks, rows, t_cls, t_patch)
    assert torch.isfinite(out["loss"]) and out["loss_patch"] == 0  # the original gave NaN here
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters() if p.requires_grad)
    assert select_objectives(True, {"token": 1, "fea": 1, "patch": 1}, 0.0) == ("token", "fea")


def test_clip_teacher_token_objective_only_and_no_unused_heads():
    assert models.teacher_spec("clip_vitl14").patch_targets is False  # a capability, not the name
    objectives = select_objectives(models.teacher_spec("clip_vitl14").patch_targets, {"token": 1, "fea": 1, "patch": 1}, 0.5)
    assert objectives == ("token",)
    d = tiny_distiller(objectives)
    assert set(d.heads["t"]) == {"token"} and not d.student.mask_token.requires_grad
    x, masks, rows, t_cls, t_patch = fixed_batch()
    out = run(d, x, masks, rows, t_cls, t_patch)
    out["loss"].backward()
    # every trainable parameter receives a gradient, so DDP needs no find_unused_parameters
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)
    torch.testing.assert_close(out["loss"], nn.MSELoss()(d.heads['t']['token'](d.student.forward_features(x)["cls"]), t_cls))


def test_mask_generator_fixed_ratio_and_probability():
    gen = MaskGenerator(256, 0.5, [0.5], seed=0)
    masks, rows = gen(128)
    assert rows.numel() == 64 and masks.sum(1)[rows].eq(128).all()  # 64 masked samples x 128 tokens
    assert masks.sum() == 64 * 128 and not masks[~torch.isin(torch.arange(128), rows)].any()


def test_mask_generator_stratified_range():
    gen = MaskGenerator(100, 1.0, [0.1, 0.5], seed=0)
    masks, rows = gen(8)
    counts = sorted(masks.sum(1).tolist())
    edges = torch.linspace(0.1, 0.5, 9)
    for i, k in enumerate(counts):  # one ratio per stratum of [0.1, 0.5]
        assert int(100 * edges[i]) <= k <= int(100 * edges[i + 1])


@pytest.mark.parametrize("prob,ratio,needle", [(0.5, [1.5], "--mask-ratio must lie in [0, 1]"),
                                               (1.2, [0.5], "--mask-probability must be in [0, 1]"),
                                               (0.5, [0.6, 0.2], "LO <= HI")])
def test_mask_config_errors(prob, ratio, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate_mask_config(prob, ratio)


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
