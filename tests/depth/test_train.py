"""NYU-Depth V2 on mmseg (depth/ + common/mmseg_plugin): CPU tests on tiny synthetic data.

Covers the depth heads (bounded output, SiLog on gt_depth_map), the fixed test-mode dispatch of
ProteusDepthEstimator, every shipped depth config (parses + builds with a tiny backbone), the depth
optimizer recipe, and for the DPT and linear families: train 2 iterations -> validate (RMSE, d1,
abs_rel with the NYU crop) -> save -> resume -> test from the saved checkpoint.
"""
import glob
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

import common.mmseg_plugin  # noqa: E402,F401  (installs the mmcv.ops shim before mmseg.models)
import depth.heads  # noqa: E402,F401  (registers DepthDPTHead, LinearDepthHead, ProteusDepthEstimator)
from common.mmseg_plugin.smoke import shrink_config  # noqa: E402
from tests.common.mmseg_helpers import train_resume_test  # noqa: E402

init_default_scope("mmseg")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "depth", "configs", "*.py")))
DPT_S = os.path.join(REPO, "depth/configs/dpt_proteus-vit-s14_4xb4-25k_nyu-518x518.py")
DPT_B = os.path.join(REPO, "depth/configs/dpt_proteus-vit-b14_4xb4-25k_nyu-518x518.py")
LINEAR_S = os.path.join(REPO, "depth/configs/linear_proteus-vit-s14_4xb4-25k_nyu-518x518.py")


def write_nyu(root, n_train=2, n_test=1, h=480, w=640):
    """NYU layout (mmseg's converter): images/{train,test}/*.jpg, annotations/*/*.png uint16 millimetres.

    Full 480x640 frames so that the metric's fixed NYU crop (rows 45:471, cols 41:601) is meaningful.
    """
    import cv2

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        os.makedirs(os.path.join(root, "images", split))
        os.makedirs(os.path.join(root, "annotations", split))
        for i in range(n):
            depth_mm = np.tile(np.linspace(1000, 6000, w, dtype=np.float32), (h, 1)) + 500 * i
            depth_mm[:20] = 0  # invalid pixels, as in real NYU maps
            img = (rng.random((h, w, 3)) * 40 + depth_mm[..., None] / 6000 * 200).astype(np.uint8)
            cv2.imwrite(os.path.join(root, "images", split, f"bedroom_{i:04d}.jpg"), img)
            cv2.imwrite(os.path.join(root, "annotations", split, f"bedroom_{i:04d}.png"), depth_mm.astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    return write_nyu(str(tmp_path_factory.mktemp("nyu")))


def tiny_model(config, **model_overrides):
    cfg = shrink_config(Config.fromfile(config))
    cfg.model.update(model_overrides)
    return MODELS.build(cfg.model), cfg


def depth_sample(h, w, value=2.0):
    sample = SegDataSample()
    sample.gt_depth_map = PixelData(data=torch.full((1, h, w), value))
    sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), padding_size=[0, 0, 0, 0]))
    return sample


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- heads
@pytest.mark.parametrize("config", [DPT_S, LINEAR_S], ids=["dpt", "linear"])
def test_depth_heads_bounded_and_trained_with_silog(config):
    model, cfg = tiny_model(config)
    head = model.decode_head
    feats = model.backbone(torch.randn(2, 3, 56, 56))
    pred = head(feats)
    assert pred.shape[:2] == (2, 1)
    assert ((pred > head.min_depth) & (pred < head.max_depth)).all()
    saturated = head.to_depth(torch.tensor([-1e4, 0.0, 1e4]))
    assert saturated.tolist() == pytest.approx([1e-3, (10 + 1e-3) / 2, 10.0])
    losses = head.loss(feats, [depth_sample(56, 56), depth_sample(56, 56)], cfg.model.train_cfg)
    assert set(losses) == {"loss_silog"} and torch.isfinite(losses["loss_silog"])
    losses["loss_silog"].backward()
    assert head.conv_seg.weight.grad is not None and head.conv_seg.weight.grad.abs().sum() > 0


def test_depth_head_rejects_several_outputs():
    with pytest.raises(ValueError, match="one channel"):
        MODELS.build(dict(type="LinearDepthHead", in_channels=[8, 8], num_classes=3, norm_cfg=dict(type="BN")))


# ---------------------------------------------------------------- test-mode dispatch (mmseg's slide bug)
@pytest.mark.slow
@pytest.mark.parametrize("mode,expected_calls", [("whole", 1), ("slide", 3), ("slide_flip", 6)])
def test_depth_estimator_really_slides(mode, expected_calls):
    """mmseg 1.2.2's DepthEstimator slides and then overwrites the result with a whole-image pass for
    mode='slide' (4 backbone calls here, whole-image output); ours returns the sliding-window result."""
    model, _ = tiny_model(LINEAR_S, test_cfg=dict(mode=mode, crop_size=(56, 56), stride=(14, 14)))
    model.eval()
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    h, w = 56, 84  # 3 windows of 56 px at stride 14 along the width
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, h, w), [depth_sample(h, w)])
    assert len(calls) == expected_calls
    assert out[0].pred_depth_map.data.shape == (1, h, w)


def test_depth_estimator_rejects_unknown_mode():
    model, _ = tiny_model(LINEAR_S, test_cfg=dict(mode="sliding"))
    with pytest.raises(ValueError, match="slide_flip"):
        model.inference(torch.randn(1, 3, 56, 56), [depth_sample(56, 56).metainfo])


# ---------------------------------------------------------------- shipped configs and recipe
@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_builds_tiny(config):
    full = Config.fromfile(config)
    assert full.model.type == "ProteusDepthEstimator" and full.model.backbone.img_size == 518
    assert full.model.test_cfg == dict(mode="slide_flip", crop_size=(518, 518), stride=(129, 129))
    assert full.val_evaluator.crop_type == "nyu_crop" and full.train_cfg.max_iters == 25000
    cfg = shrink_config(full)
    model = MODELS.build(cfg.model)
    model.eval()
    with torch.no_grad():
        pred = model(torch.randn(1, 3, 56, 56), mode="tensor")
    assert pred.shape[:2] == (1, 1) and ((pred > 0) & (pred <= 10.0)).all()
    frozen = full.model.backbone.get("frozen", False)
    assert all(not p.requires_grad for p in model.backbone.parameters()) == frozen


def test_depth_recipe_lrs_and_post_process_channels():
    s, b = Config.fromfile(DPT_S), Config.fromfile(DPT_B)
    assert s.optim_wrapper.optimizer.lr == 4e-4 and b.optim_wrapper.optimizer.lr == 1e-4
    assert s.model.decode_head.post_process_channels == [48, 96, 192, 384]
    assert b.model.decode_head.post_process_channels == [96, 192, 384, 768]
    large = Config.fromfile(DPT_B.replace("vit-b14", "vit-l14"))
    assert large.model.decode_head.post_process_channels == [128, 256, 512, 1024]
    assert large.model.backbone.out_indices == [7, 11, 15, 23]
    model, cfg = tiny_model(DPT_S)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr_of = {id(p): g["lr"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["backbone.vit.blocks.0.attn.qkv.weight"])] == pytest.approx(4e-5)  # backbone x0.1
    assert lr_of[id(named["backbone.vit.patch_embed.proj.weight"])] == pytest.approx(4e-5)
    assert lr_of[id(named["decode_head.conv_seg.weight"])] == pytest.approx(4e-4)


# ---------------------------------------------------------------- train / val / save / resume / test
def run_family(config, nyu_root, tmp_path):
    val, metrics = train_resume_test("depth", config, nyu_root, tmp_path, "rmse", name_len=16)
    assert 0.0 < val["rmse"] < 10.0 and 0.0 <= val["d1"] <= 1.0 and np.isfinite(val["abs_rel"])
    # the same weights on the same image must reproduce the validation numbers of iteration 2 exactly
    assert metrics["rmse"] == pytest.approx(val["rmse"], rel=1e-6)
    assert metrics["d1"] == pytest.approx(val["d1"]) and metrics["abs_rel"] == pytest.approx(val["abs_rel"])


@pytest.mark.slow
def test_dpt_family_end_to_end(nyu_root, tmp_path):
    run_family(DPT_S, nyu_root, tmp_path)


@pytest.mark.slow
def test_linear_depth_family_end_to_end(nyu_root, tmp_path):
    run_family(LINEAR_S, nyu_root, tmp_path)
