"""ADE20K segmentation on mmseg (segmentation/ + common/mmseg_plugin): CPU tests on tiny synthetic data.

Covers the plugin pieces (mmcv.ops shim, ProteusViT, weight loading, layer-wise lr decay), every
shipped segmentation config (parses + builds with a tiny backbone), and for the linear and UperNet
families: train 2 iterations -> validate -> save -> resume -> test from the saved checkpoint, plus
one 2-process gloo torchrun run.
"""
import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

import common.mmseg_plugin  # noqa: E402,F401  (installs the mmcv.ops shim before mmseg.models)
import models  # noqa: E402
from common.mmseg_plugin import ProteusViT  # noqa: E402
from common.mmseg_plugin.smoke import shrink_config  # noqa: E402
from tests.common.mmseg_helpers import tiny_config_file, train_resume_test  # noqa: E402
from tests.linear_eval.helpers import assert_user_error, data, pretrain_dir  # noqa: F401

init_default_scope("mmseg")  # registry look-ups outside a Runner (optimizer constructor)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "segmentation", "configs", "*.py")))
UPERNET_S = os.path.join(REPO, "segmentation/configs/upernet_proteus-vit-s14_4xb8-60k_ade20k-518x518.py")
LINEAR_S = os.path.join(REPO, "segmentation/configs/linear_proteus-vit-s14_4xb8-60k_ade20k-518x518.py")
TINY = dict(depth=4, embed_dim=64, num_heads=2)


def write_ade20k(root, n_train=2, n_val=1, h=64, w=80):
    """ADE20K layout: images/{training,validation}/*.jpg + annotations/*/*.png, label 0 = ignored."""
    import cv2

    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(root, "images", split))
        os.makedirs(os.path.join(root, "annotations", split))
        for i in range(n):
            label = np.zeros((h, w), np.uint8)
            label[:, : w // 2] = 1 + i
            label[h // 2:, w // 2:] = 12
            label[:4] = 0  # "other": ignored with reduce_zero_label
            img = (rng.random((h, w, 3)) * 60 + label[..., None] * 15).astype(np.uint8)
            cv2.imwrite(os.path.join(root, "images", split, f"ADE_{split}_{i:08d}.jpg"), img)
            cv2.imwrite(os.path.join(root, "annotations", split, f"ADE_{split}_{i:08d}.png"), label)
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return write_ade20k(str(tmp_path_factory.mktemp("ade")))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- compatibility shims
def test_mmcv_ops_shim_provides_point_sample_and_clear_errors():
    from mmcv.ops import point_sample

    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    centre = point_sample(feats, torch.tensor([[[0.5, 0.5]]]), align_corners=False)
    assert centre.shape == (1, 1, 1) and torch.isclose(centre, feats.mean()).item()
    with pytest.raises(ModuleNotFoundError, match="compiled mmcv"):
        from mmcv.ops import PSAMask  # noqa: F401
    from mmcv.ops import sigmoid_focal_loss
    with pytest.raises(RuntimeError, match="mmcv-lite"):
        sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))


# ---------------------------------------------------------------- backbone
@pytest.mark.parametrize("patch_size,img_size", [(14, 56), (16, 64)])
def test_backbone_shapes_cls_pairs_and_runtime_pos_interpolation(patch_size, img_size):
    bb = ProteusViT(arch="vit_small", patch_size=patch_size, img_size=img_size, out_indices=[1, 3],
                    output_cls_token=True, overrides=TINY)
    grid = img_size // patch_size
    assert bb.vit.pos_embed.shape == (1, grid * grid + 1, 64)  # stored at the crop size
    h, w = 2 * patch_size, 5 * patch_size  # any other multiple of the patch: interpolated at run time
    outs = bb(torch.randn(2, 3, h, w))
    assert len(outs) == 2
    for fmap, cls in outs:
        assert fmap.shape == (2, 64, 2, 5) and cls.shape == (2, 64)


def test_backbone_final_norm_and_unused_parameters_frozen():
    torch.manual_seed(0)
    raw = ProteusViT(arch="vit_small", img_size=56, out_indices=[1, 2], overrides=TINY)
    normed = ProteusViT(arch="vit_small", img_size=56, out_indices=[1, 2], final_norm=True, overrides=TINY)
    normed.load_state_dict(raw.state_dict())
    x = torch.randn(1, 3, 56, 56)
    a, b = raw(x)[1], normed(x)[1]
    tokens = a.flatten(2).transpose(1, 2)  # (1, N, D)
    expected = raw.vit.norm(tokens).transpose(1, 2).reshape(a.shape)
    assert torch.allclose(b, expected, atol=1e-5) and not torch.allclose(a, b)
    # params outside the graph must not require grad (DDP without find_unused_parameters)
    frozen = {n for n, p in raw.named_parameters() if not p.requires_grad}
    assert "vit.mask_token" in frozen and "vit.norm.weight" in frozen
    assert any(n.startswith("vit.blocks.3.") for n in frozen) and not any(n.startswith("vit.blocks.2.") for n in frozen)
    assert "vit.norm.weight" not in {n for n, p in normed.named_parameters() if not p.requires_grad}


def test_backbone_frozen_mode_stays_eval_and_gives_no_grad():
    bb = ProteusViT(arch="vit_small", img_size=56, out_indices=[3], frozen=True, drop_path_rate=0.5,
                    overrides=TINY)
    bb.train()
    assert not bb.vit.training and not any(p.requires_grad for p in bb.parameters())
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(bb(x)[0], bb(x)[0])  # drop path inactive
    assert not bb(x)[0].requires_grad


def test_backbone_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ProteusViT(arch="vit_small", patch_size=16, img_size=518, overrides=TINY)
    with pytest.raises(ValueError, match="out_indices"):
        ProteusViT(arch="vit_small", img_size=56, out_indices=[4], overrides=TINY)


@pytest.fixture(scope="module")
def vit_tiny_state():
    """A ViT-Ti/14 built at 224 px (pos_embed on a 16x16 grid), as our pretraining exports it."""
    return models.build_student("vit_tiny").state_dict()


def _save(path, sd, wrap=None):
    if wrap == "proteus_release":  # original Proteus training checkpoints: model / student.backbone.*
        sd = {"model": {f"student.backbone.{k}": v for k, v in sd.items()}}
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def vit_tiny_dense():
    """One ViT-Ti ProteusViT at 56 px, re-pointed at different checkpoint files by the loading tests."""
    return ProteusViT(arch="vit_tiny", img_size=56, out_indices=[11], drop_path_rate=0.1)


@pytest.mark.parametrize("wrap", [None, "proteus_release"])
def test_backbone_loads_checkpoint_and_resamples_pos_embed(tmp_path, vit_tiny_state, vit_tiny_dense, wrap):
    bb = vit_tiny_dense
    bb.checkpoint = _save(str(tmp_path / "backbone.pth"), vit_tiny_state, wrap)
    bb.vit.blocks[5].attn.qkv.weight.data.zero_()
    bb.init_weights()
    assert torch.equal(bb.vit.blocks[5].attn.qkv.weight, vit_tiny_state["blocks.5.attn.qkv.weight"])
    expected_pos = models.weights.fit_pos_embed(vit_tiny_state, bb.vit)["pos_embed"]
    assert bb.vit.pos_embed.shape == (1, 17, 192) and torch.allclose(bb.vit.pos_embed, expected_pos)


def test_backbone_loading_names_missing_and_unexpected_keys(tmp_path, vit_tiny_state, vit_tiny_dense):
    bb = vit_tiny_dense
    bb.checkpoint = _save(str(tmp_path / "extra.pth"), {**vit_tiny_state, "blocks.0.attn.rel_pos_bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys: blocks.0.attn.rel_pos_bias"):
        bb.init_weights()
    bb.checkpoint = _save(str(tmp_path / "missing.pth"),
                          {k: v for k, v in vit_tiny_state.items() if k != "blocks.3.mlp.fc1.weight"})
    with pytest.raises(ValueError, match="missing keys: blocks.3.mlp.fc1.weight"):
        bb.init_weights()
    bb.checkpoint = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="model.backbone.checkpoint=PATH"):
        bb.init_weights()
    tiny = ProteusViT(arch="vit_tiny", img_size=56, checkpoint=_save(str(tmp_path / "ok.pth"), vit_tiny_state),
                      out_indices=[1], overrides=TINY)
    with pytest.raises(ValueError, match="shape mismatches"):  # a tiny test backbone cannot take ViT-Ti weights
        tiny.init_weights()


# ---------------------------------------------------------------- layer-wise lr decay
def test_layer_decay_constructor_follows_our_parameter_names():
    cfg = shrink_config(Config.fromfile(UPERNET_S))
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)  # as the Runner does
    base, depth = 1e-4, 4
    by_param = {}
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            by_param[id(p)] = group
    named = dict(model.named_parameters())

    def lr(name):
        return by_param[id(named[name])]["lr"]

    def wd(name):
        return by_param[id(named[name])]["weight_decay"]

    assert lr("backbone.vit.patch_embed.proj.weight") == pytest.approx(base * 0.65 ** (depth + 1))
    assert lr("backbone.vit.pos_embed") == pytest.approx(base * 0.65 ** (depth + 1))
    for i in range(depth):
        assert lr(f"backbone.vit.blocks.{i}.attn.qkv.weight") == pytest.approx(base * 0.65 ** (depth - i))
    assert lr("decode_head.conv_seg.weight") == pytest.approx(base)
    assert wd("backbone.vit.blocks.0.attn.qkv.weight") == 0.05
    assert wd("backbone.vit.blocks.0.attn.qkv.bias") == 0.0 and wd("backbone.vit.pos_embed") == 0.0
    assert wd("backbone.vit.cls_token") == 0.0 and wd("backbone.vit.blocks.0.norm1.weight") == 0.0
    assert id(named["backbone.vit.mask_token"]) not in by_param  # frozen: not optimised
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(by_param) == trainable


# ---------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_builds_tiny(config):
    full = Config.fromfile(config)
    assert full.model.backbone.img_size == 518 and full.model.test_cfg.crop_size == (518, 518)
    assert full.model.backbone.checkpoint.startswith("pretrained/proteus-vit-")
    cfg = shrink_config(full)
    model = MODELS.build(cfg.model)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 56, 56), mode="tensor")
    assert logits.shape[:2] == (1, 150) and torch.isfinite(logits).all()
    frozen = full.model.backbone.get("frozen", False)
    assert all(not p.requires_grad for p in model.backbone.parameters()) == frozen


def test_config_recipes_match_the_paper_settings():
    s = Config.fromfile(UPERNET_S)
    large = Config.fromfile(UPERNET_S.replace("vit-s14_4xb8-60k", "vit-l14_4xb2-160k"))
    assert s.optim_wrapper.optimizer.lr == 1e-4 and s.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.65
    assert s.model.neck.rescales == [4, 2, 1, 0.5] and s.model.test_cfg.stride == (345, 345)
    assert s.train_cfg.max_iters == 60000 and large.train_cfg.max_iters == 160000
    assert s.model.backbone.drop_path_rate == 0.1 and large.model.backbone.drop_path_rate == 0.2
    assert large.model.backbone.out_indices == [7, 11, 15, 23]
    lin = Config.fromfile(LINEAR_S)
    assert lin.model.backbone.frozen and lin.model.decode_head.type == "LinearProbeHead"


# ---------------------------------------------------------------- train / val / save / resume / test
def run_family(config, ade_root, tmp_path):
    val, metrics = train_resume_test("segmentation", config, ade_root, tmp_path, "mIoU")
    assert 0.0 <= val["mIoU"] <= 100.0
    assert metrics["mIoU"] == pytest.approx(val["mIoU"])  # same weights, same data as validation at step 2


@pytest.mark.slow
def test_linear_probe_family_end_to_end(ade_root, tmp_path):
    run_family(LINEAR_S, ade_root, tmp_path)


@pytest.mark.slow
def test_upernet_family_end_to_end(ade_root, tmp_path):
    run_family(UPERNET_S, ade_root, tmp_path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_torchrun(ade_root, tmp_path):
    cfg_path = tiny_config_file(LINEAR_S, ade_root, tmp_path)
    work = str(tmp_path / "work")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "segmentation.train", cfg_path, "--work-dir", work]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]  # a rank's own message
    assert proc.returncode == 0, "\n".join(errors) + proc.stdout[-3000:] + proc.stderr[-3000:]
    log = open(glob.glob(os.path.join(work, "*", "*.log"))[0]).read()
    assert "Distributed training: True" in log and "GPU number: 2" in log  # mmengine: world size
    with common.mmseg_plugin.mmengine_checkpoint_globals():  # mmengine's types, for this load only
        ckpt = torch.load(os.path.join(work, "iter_2.pth"), map_location="cpu")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # saved unwrapped


@pytest.fixture
def mmseg_entry_points():
    pytest.importorskip("mmseg")
    from depth import test as depth_test
    from depth import train as depth_train
    from segmentation import test as seg_test
    from segmentation import train as seg_train

    return seg_train.main, seg_test.main, depth_train.main, depth_test.main


SEG_CONFIG = os.path.join(REPO, "segmentation/configs/linear_proteus-vit-t14_4xb8-60k_ade20k-518x518.py")


DEPTH_CONFIG = os.path.join(REPO, "depth/configs/linear_proteus-vit-t14_4xb4-25k_nyu-518x518.py")


def test_dense_entry_points_user_errors(mmseg_entry_points, data, tmp_path, capsys):
    seg_train, seg_test, depth_train, depth_test = mmseg_entry_points
    work = ["--work-dir", str(tmp_path / "work")]
    assert_user_error(seg_train, [str(tmp_path / "none.py"), *work], capsys, "segmentation.train",
                      "config file not found", "segmentation/configs")
    assert_user_error(seg_train, [SEG_CONFIG, *work, "--cfg-options",
                                  f"train_dataloader.dataset.data_root={tmp_path / 'no_ade'}"],
                      capsys, "segmentation.train", "data_root", "no_ade")
    assert_user_error(depth_train, [DEPTH_CONFIG, *work, "--cfg-options",
                                    f"train_dataloader.dataset.data_root={tmp_path / 'no_nyu'}"],
                      capsys, "depth.train", "data_root", "no_nyu")
    assert_user_error(seg_test, [SEG_CONFIG, str(tmp_path / "iter_9.pth"), *work], capsys, "segmentation.test",
                      "checkpoint not found", "iter_9.pth")
    ade = tmp_path / "ade"
    for sub in ("images/training", "annotations/training", "images/validation", "annotations/validation"):
        os.makedirs(ade / sub)
    assert_user_error(seg_train, [SEG_CONFIG, *work, "--cfg-options", f"train_dataloader.dataset.data_root={ade}",
                                  f"val_dataloader.dataset.data_root={ade}",
                                  f"model.backbone.checkpoint={tmp_path / 'backbone.pth'}"],
                      capsys, "segmentation.train", "backbone checkpoint", "backbone.pth")
    nyu = tmp_path / "nyu"
    for sub in ("images/test", "annotations/test"):
        os.makedirs(nyu / sub)
    foreign = pretrain_dir(tmp_path / "a_pretrain_run")
    assert_user_error(depth_test, [DEPTH_CONFIG, data["ckpt"], "--work-dir", foreign, "--cfg-options",
                                   f"test_dataloader.dataset.data_root={nyu}"], capsys, "depth.test",
                      "belongs to a pretrain run", untouched=foreign)
    assert not os.path.exists(tmp_path / "work")  # nothing created for a refused run


def test_dense_config_that_is_not_a_config_is_a_config_error(mmseg_entry_points, data, tmp_path, capsys):
    seg_train, seg_test, depth_train, _ = mmseg_entry_points
    work = ["--work-dir", str(tmp_path / "work")]
    assert_user_error(seg_train, [data["ckpt"], *work], capsys, "segmentation.train", "not an mmengine config",
                      ".py/.yml/.yaml/.json", os.path.basename(data["ckpt"]))
    assert_user_error(seg_test, [data["ckpt"], data["ckpt"], *work], capsys, "segmentation.test",
                      "not an mmengine config")
    (tmp_path / "typo.py").write_text("_base_ = [SEG_BASE]\n")  # a name the config never defines
    assert_user_error(depth_train, [str(tmp_path / "typo.py"), *work], capsys, "depth.train", "typo.py",
                      "NameError", "SEG_BASE")
    (tmp_path / "other_base.py").write_text(f"_base_ = [{data['ckpt']!r}]\n")  # a _base_ that is no config
    assert_user_error(seg_train, [str(tmp_path / "other_base.py"), *work], capsys, "segmentation.train",
                      "other_base.py")
    assert not os.path.exists(tmp_path / "work")
