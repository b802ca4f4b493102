"""A new objective is one register_objective call: here a cosine loss on the CLS token, with a head of its own,
registered by this file alone. pretrain.main then takes --lambda-cos, builds the head, trains it, logs it."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from pretrain import config, losses
from pretrain import main as pretrain_main
from pretrain.losses import ProteusDistiller, TargetSpec, select_objectives
from pretrain.masking import MaskGenerator, validate_mask_config
from tests.pretrain.helpers import DT, B, read_log, teacher_ckpt, tiny_args, tiny_data, tiny_distiller  # noqa: F401


def cls_cosine(x: losses.LossInputs) -> torch.Tensor:
    """1 - cos(cos_head(student CLS), teacher CLS), averaged over the batch."""
    pred = x.heads["cos"](x.s_cls).float()
    return (1 - F.cosine_similarity(pred, x.t_cls.float(), dim=-1)).mean()


@pytest.fixture
def cosine_objective():
    entry = losses.register_objective("cos", ("cos",), 0.5, cls_cosine, "weight of a cosine loss on the CLS",
                                      new_heads={"cos": "cls"})
    yield entry
    del losses.OBJECTIVES["cos"], losses.HEADS["cos"]


def test_a_registered_objective_gets_its_knob(cosine_objective):
    cfg = pretrain_main.parse_config(["--lambda-cos", "2"])
    assert cfg["lambda_cos"] == 2.0 and pretrain_main.parse_config([])["lambda_cos"] == 0.5
    knob = next(k for k in config.expand(pretrain_main.KNOBS) if k.name == "lambda_cos")
    assert knob.group == "objective" and knob.bounded and knob.resume == "must-match"
    assert losses.select_objectives(True, config.lambdas_of(cfg), 0.5) == ("token", "fea", "patch", "cos")


def test_the_objective_sets_gradients(cosine_objective):
    torch.manual_seed(0)
    student = pretrain_main.models.build_student("vit_tiny", patch_size=14, img_size=28, depth=1, embed_dim=16,
                                                 num_heads=2)
    d = losses.ProteusDistiller(student, [losses.TargetSpec("t", 8, ("cos",))], {"cos": 1.0}, grid=(2, 2))
    assert set(d.heads["t"]) == {"cos"} and d.loss_names == ["loss", "t/cos"] and not d.masked_view
    x, t_cls, t_patch = torch.randn(3, 3, 28, 28), torch.randn(3, 8), torch.randn(3, 4, 8)
    out = d(x, torch.zeros(3, 4, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
            {"t": {"cls": t_cls, "patch": t_patch}})
    assert torch.equal(out["loss"], out["t/cos"]) and 0 < out["loss"].item() < 2
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.heads["t"]["cos"].parameters())
    assert student.cls_token.grad.abs().sum() > 0  # the loss reaches the student through its CLS


@pytest.mark.slow
def test_training_with_only_the_new_objective(cosine_objective, tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=1, lambda_token=0, lambda_fea=0, lambda_patch=0,
                     lambda_cos=1.0, pca_every_epochs=0)
    assert pretrain_main.main(argv) == 0
    rows = [r for r in read_log(out) if "train/loss" in r]
    assert rows and all("train/dinov2_vits14/cos" in r and "train/dinov2_vits14/token" not in r for r in rows)
    assert all(math.isclose(r["train/loss"], r["train/dinov2_vits14/cos"], rel_tol=1e-6) for r in rows)
    ckpt = torch.load(f"{out}/checkpoint.pth", weights_only=True)
    assert set(ckpt["heads"]) == {"cos_head"} and ckpt["config"]["objectives"] == {"dinov2_vits14": ["cos"]}
    assert rows[-1]["train/dinov2_vits14/cos"] < rows[0]["train/dinov2_vits14/cos"]  # it trains

os.environ["HF_HUB_OFFLINE"] = "1"


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


def test_a_summary_wider_than_the_patch_tokens_gets_its_own_head_width():
    """C-RADIO: the summary is k x D (here 3 x DT); the token head predicts it, the feature/patch heads DT."""
    torch.manual_seed(0)
    student = models.build_student("vit_tiny", patch_size=14, img_size=28, depth=1, embed_dim=16, num_heads=2)
    d = ProteusDistiller(student, [TargetSpec("t", DT, ("token", "fea", "patch"), cls_dim=3 * DT)],
                         {"token": 1.0, "fea": 1.0, "patch": 1.0}, grid=(2, 2)).double()
    assert {h: head[1].out_features for h, head in d.heads["t"].items()} == {"token": 3 * DT, "fea": DT, "patch": DT}
    x, masks, rows, _, t_patch = fixed_batch()
    t_cls = torch.randn(B, 3 * DT, dtype=torch.float64)  # (B, k x DT)
    out = run(d, x, masks, rows, t_cls, t_patch)
    s = d.student.forward_features(x)
    cls_sq = (d.heads["t"]["token"](s["cls"]) - t_cls).pow(2).sum()
    patch_sq = (d.heads["t"]["fea"](s["patch"]) - t_patch).pow(2).sum()
    torch.testing.assert_close(out["loss_token"], cls_sq / t_cls.numel())
    torch.testing.assert_close(out["loss_fea"], (cls_sq + patch_sq) / (t_cls.numel() + t_patch.numel()))
