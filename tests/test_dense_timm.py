"""A timm CNN student in the dense evaluation: mmseg's own TIMMBackbone loads our export (the timm model's
state dict) and the shipped UperNet config builds, runs and back-propagates on CPU."""
import os

import pytest
import torch

import common.mmseg_plugin  # noqa: F401 - installs the mmcv.ops shim before mmseg's models load
import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "segmentation", "configs", "timm", "upernet_timm-resnet50_4xb8-60k_ade20k-518x518.py")


def test_timm_student_export_in_mmseg_timmbackbone(tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")

    student = models.build_student("timm:resnet18", img_size=64).eval()
    path = str(tmp_path / "student_backbone.pth")
    torch.save(student.model.state_dict(), path)  # what pretrain.main exports for a timm student
    cfg = Config.fromfile(CONFIG)
    assert cfg.model.backbone.type == "TIMMBackbone" and cfg.model.neck is None
    cfg.model.backbone.update(model_name="resnet18", checkpoint_path=path)
    cfg.model.decode_head.update(in_channels=[64, 128, 256, 512], channels=32)
    cfg.model.auxiliary_head.update(in_channels=256, channels=16)
    for part in (cfg.model.decode_head, cfg.model.auxiliary_head):
        part.norm_cfg = dict(type="BN", requires_grad=True)
    model = MODELS.build(cfg.model)
    model.init_weights()
    x = torch.randn(2, 3, 64, 64)
    feats = model.backbone.eval()(x)
    ref = student.model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(feats, ref))  # exactly the distilled weights
    model.train()
    logits = model(x, mode="tensor")
    assert logits.shape[:2] == (2, 150) and torch.isfinite(logits).all()
    logits.mean().backward()
    assert model.backbone.timm_model.conv1.weight.grad is not None
