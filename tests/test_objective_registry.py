"""A new objective is one register_objective call: here a cosine loss on the CLS token, with a head of its own,
registered by this file alone. pretrain.main then takes --lambda-cos, builds the head, trains it, logs it."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain import config
from pretrain import losses
from pretrain import main as pretrain_main
from test_pretrain_fixtures import read_log, teacher_ckpt, tiny_args, tiny_data  # noqa: F401


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
