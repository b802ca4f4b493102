"""Issue #12: several teachers at once, any timm model as the student, grid resampling and PHI-S.

Two real-format teachers: an official-format DINOv2 ViT-S/14 file (patch 14) and an OpenAI-format CLIP
ViT-B/16 visual state dict (patch 16, CLIP normalisation, token objective only), both random weights.
"""
import math
import os
import signal
import subprocess

import pytest
import torch

import models
from pretrain import main as pretrain_main
from pretrain.targets import PhiS, TargetNormaliser, hadamard, prepare_targets
from tests import fault_injection
from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, teacher_ckpt, text_log,  # noqa: F401
                                    tiny_args, tiny_data, train_losses)


# ---- unit tests against hand-computed values ---------------------------------------------------------------
def test_grid_resampling_is_bilinear_on_cell_centres():
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 4, 1)  # (B, N, D) on a 2x2 grid
    out = models.resample_grid(grid, (2, 2), (4, 4)).reshape(4, 4)
    # output cell centres sit at source coordinates -0.25, 0.25, 0.75, 1.25 (clamped at the border)
    want = torch.tensor([[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5],
                         [2.0, 2.25, 2.75, 3.0]])
    torch.testing.assert_close(out, want)
    same = torch.randn(2, 9, 5)
    assert models.resample_grid(same, (3, 3), (3, 3)) is same  # on-grid teachers are untouched


def test_hadamard_matrices():
    for d in (1, 2, 8, 12, 24, 64, 384, 768):
        h = hadamard(d)
        assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
        torch.testing.assert_close(h @ h.T, d * torch.eye(d, dtype=torch.float64))
    assert hadamard(100) is None and hadamard(36) is None


def test_phis_on_a_hand_computed_distribution():
    # x = mean + diag(2, 1) z along the axes: eigenvalues 4 and 1, phi^2 = 2.5. After PHI-S each dimension
    # has variance 1 and the correlation is (4 - 1) / (4 + 1) = 0.6 in magnitude (H mixes, it does not whiten).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    x = z * torch.tensor([2.0, 1.0], dtype=torch.float64) + torch.tensor([1.0, 2.0], dtype=torch.float64)
    phi = PhiS(2)
    phi.fit(x.shape[0], x.sum(0), x.T @ x)
    y = phi(x).double()
    cov = torch.cov(y.T)
    torch.testing.assert_close(cov.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-3, rtol=0)
    assert abs(abs(float(cov[0, 1])) - 0.6) < 1e-3
    torch.testing.assert_close(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    r = phi.rotation.double()
    torch.testing.assert_close(r @ r.T * 2.5, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)  # orthogonal / phi


def test_prepare_targets_resamples_and_normalises_per_teacher():
    raw = {"a": {"cls": torch.randn(2, 8), "patch": torch.randn(2, 4, 8)},
           "b": {"cls": torch.randn(2, 12), "patch": torch.randn(2, 16, 12)}}
    out = prepare_targets(raw, {"a": (2, 2), "b": (4, 4)}, (2, 2), None)
    assert out["a"]["patch"] is raw["a"]["patch"] and out["b"]["patch"].shape == (2, 4, 12)
    norm = TargetNormaliser({"a": 8, "b": 12})
    assert not norm.fitted
    normed = prepare_targets(raw, {"a": (2, 2), "b": (4, 4)}, (2, 2), norm)  # unfitted = identity map
    torch.testing.assert_close(normed["b"]["cls"], raw["b"]["cls"])
    wide = TargetNormaliser({"r": {"cls": 24, "patch": 8}})  # C-RADIO: a k x D summary, D-wide patch tokens
    assert wide.norms["r/cls"].rotation.shape == (24, 24) and wide.norms["r/patch"].rotation.shape == (8, 8)


# ---- two real-format teachers end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> str:
    """An OpenAI-format CLIP ViT-B/16 visual state dict (keys visual.*), random weights."""
    clip_model = pytest.importorskip("clip.model")
    torch.manual_seed(1)
    tower = clip_model.VisionTransformer(input_resolution=224, patch_size=16, width=768, layers=12, heads=12,
                                         output_dim=512)
    path = tmp_path_factory.mktemp("clip") / "clip_vitb16_visual.pth"
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, path)
    return str(path)


def two_teacher_args(data, dino, clip, out, **kw):
    # 112 px: DINOv2 /14 gives 8x8, CLIP /16 gives 7x7 (resampled to the student's 8x8 grid)
    return tiny_args(data, f"{dino},{clip}", out, teacher="dinov2_vits14,clip_vitb16", input_size=112,
                     teacher_weight="1,0.5", teacher_norm_batches=2, **kw)


@pytest.mark.slow
def test_two_teachers_train_log_both_and_resume_bitwise_after_kill9(tmp_path, tiny_data, teacher_ckpt, clip_ckpt):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    argv_ref = two_teacher_args(tiny_data, teacher_ckpt, clip_ckpt, ref_out, pca_every_epochs=0, epochs=1)
    assert pretrain_main.main(argv_ref) == 0
    rows = [r for r in read_log(ref_out) if "train/loss" in r]
    for key in ("dinov2_vits14/token", "dinov2_vits14/fea", "dinov2_vits14/patch", "clip_vitb16/token"):
        assert all(math.isfinite(r[f"train/{key}"]) for r in rows), key
    assert "train/clip_vitb16/fea" not in rows[0]  # CLIP: token objective only (a capability of the teacher)
    r = rows[0]
    total = (r["train/dinov2_vits14/token"] + r["train/dinov2_vits14/fea"] + r["train/dinov2_vits14/patch"]
             + 0.5 * r["train/clip_vitb16/token"])
    assert r["train/loss"] == pytest.approx(total, rel=1e-5)
    ckpt = torch.load(os.path.join(ref_out, "checkpoint.pth"), weights_only=True)
    assert sorted(ckpt["heads"]) == ["clip_vitb16/token", "dinov2_vits14/fea", "dinov2_vits14/patch",
                                     "dinov2_vits14/token"]
    norm = ckpt["target_norm"]
    assert norm["norms.clip_vitb16/cls.fitted"] and norm["norms.dinov2_vits14/patch.fitted"]
    assert "PHI-S teacher normalisation estimated" in text_log(ref_out)

    argv = two_teacher_args(tiny_data, teacher_ckpt, clip_ckpt, out, pca_every_epochs=0, epochs=1)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "4", "--", *argv], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert pretrain_main.main(argv) == 0
    assert "PHI-S teacher normalisation estimated" not in text_log(out).split("resumed from")[-1]  # restored
    got = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    for k in ckpt["student"]:
        assert torch.equal(ckpt["student"][k], got["student"][k]), k
    for k in norm:
        assert torch.equal(norm[k], got["target_norm"][k]), k  # the statistics survived the resume
    assert train_losses(out)[6] == train_losses(ref_out)[6]


@pytest.mark.slow
def test_one_teacher_as_a_list_keeps_the_checkpoint_layout(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "one")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0,
                                        teacher="dinov2_vits14,", teacher_weight="1")) == 2  # empty name refused
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0,
                                        teacher_weight="1")) == 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert sorted(ckpt["heads"]) == ["fea_head", "patch_head", "token_head"] and "target_norm" not in ckpt
    assert set(ckpt["heads"]["token_head"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}


@pytest.mark.parametrize("overrides,needle", [
    (dict(teacher="dinov2_vits14,dinov2_vits14"), "distinct"),
    (dict(teacher_weight="1,2"), "--teacher-weight has 2 values for 1 teacher(s)"),
    (dict(teacher_weight="-1"), "finite and > 0"),
    (dict(student="timm:no_such_net"), "timm has no model"),
    (dict(teacher_summary_index="1"), "--teacher-summary-index 1: teacher dinov2_vits14 has one summary"),
    (dict(teacher_summary_index="all,1"), "--teacher-summary-index has 2 entries for 1 teacher(s)"),
    (dict(teacher_summary_index="-1"), "takes all or a summary-token index >= 0"),
    (dict(teacher_summary_index="\u00b2"), "takes all or a summary-token index >= 0"),  # '²'.isdigit(), int() refuses
])
def test_bad_teacher_lists_are_named(overrides, needle, tmp_path, tiny_data, teacher_ckpt, capsys):
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(tmp_path / "o"), **overrides)) == 2
    assert needle in capsys.readouterr().err


# ---- a timm CNN student --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_timm_cnn_student_trains_resumes_and_exports_for_timm(tmp_path, tiny_data, teacher_ckpt, monkeypatch):
    import timm

    out = str(tmp_path / "cnn")
    argv = tiny_args(tiny_data, teacher_ckpt, out, student="timm:resnet18", student_kwargs="", input_size=56,
                     pca_every_epochs=1)
    with fault_injection.injected(signal_at=3):
        assert pretrain_main.main(argv) == 75
    assert pretrain_main.main(argv) == 0  # resumes
    assert "resumed from" in text_log(out)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 13)) and all(math.isfinite(v) for v in losses.values())
    rows = [r for r in read_log(out) if "train/dinov2_vits14/patch" in r]
    assert rows and rows[-1]["train/dinov2_vits14/patch"] > 0  # pixel-space masking gives a patch loss
    path = os.path.join(out, "student_backbone.pth")
    tm = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
    ours = models.build_student("timm:resnet18", img_size=56)
    models.load_state_dict_checked(ours.model, torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(tm.eval()(x), ours.eval().forward_features(x)["cls"])  # identical outputs


def test_timm_student_pixel_masking_and_grid():
    s = models.build_student("timm:resnet18", img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    out = s.forward_features(x, masks, grid=(4, 4))
    assert out["cls"].shape == (2, 512) and out["patch"].shape == (2, 16, 512)
    torch.testing.assert_close(out["cls"], s.forward_features(x)["cls"])  # an empty mask changes nothing
    masks[0, 0] = True
    masked = models.timm_student.pixel_mask(x, masks, (4, 4))
    assert masked[0, :, :14, :14].abs().sum() == 0 and torch.equal(masked[0, :, 14:, :], x[0, :, 14:, :])
    assert torch.equal(masked[1], x[1])


@pytest.mark.slow
def test_patch16_student_from_patch14_teacher_trains_on_its_own_grid(tmp_path, tiny_data, teacher_ckpt):
    """The reverse of /14 students from /16 teachers: at 112 px DINOv2 /14 gives 8x8, resampled onto 7x7."""
    out = str(tmp_path / "p16")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, input_size=112, patch_size=16, epochs=1,
                                        pca_every_epochs=0)) == 0
    rows = [r for r in read_log(out) if "train/loss" in r]
    assert rows and all(math.isfinite(r["train/loss"]) for r in rows)
    student = torch.load(os.path.join(out, "student_backbone.pth"), weights_only=True)
    assert student["patch_embed.proj.weight"].shape[-2:] == (16, 16)
    assert student["pos_embed"].shape[1] == 1 + 7 * 7  # the student's own 7x7 grid, not the teacher's 8x8
