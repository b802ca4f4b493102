"""A timm CNN student in the dense evaluation: mmseg's own TIMMBackbone loads our export (the timm model's
state dict) and the shipped UperNet config builds, runs and back-propagates on CPU."""
import io
import os
import pickle

import pytest
import torch

import common.mmseg_plugin  # noqa: F401 - installs the mmcv.ops shim before mmseg's models load
import models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

pytestmark = pytest.mark.usefixtures("one_thread")


def _getattr_pickle(obj_global: bytes, attr: str, call_arg: str | None = None) -> bytes:
    """A protocol-2 pickle of getattr(<obj_global>, attr) and, with call_arg, of calling the result."""
    body = b"cbuiltins\ngetattr\n" + obj_global + b"X" + len(attr).to_bytes(4, "little") + attr.encode() + b"\x86R"
    if call_arg is not None:
        body += b"X" + len(call_arg).to_bytes(4, "little") + call_arg.encode() + b"\x85R"
    return b"\x80\x02" + body + b"."


def test_mmseg_plugin_keeps_getattr_out_of_the_process_allow_list(tmp_path):
    pytest.importorskip("mmseg")
    import common.mmseg_plugin  # noqa: F401  (what the dense entry points import first)

    marker = tmp_path / "getattr.marker"
    # getattr(__import__('os'), 'system')('touch marker'), and a harmless getattr a process-wide list lets through
    payload = _getattr_pickle(b"cbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R", "system", f"touch {marker}")
    probe = _getattr_pickle(b"ccollections\nOrderedDict\n", "__name__")
    for data in (payload, probe):
        with pytest.raises(pickle.UnpicklingError, match="getattr"):
            torch.load(io.BytesIO(data), weights_only=True)
    assert not marker.exists()


def test_mmengine_checkpoint_types_load_inside_their_scope_only():
    pytest.importorskip("mmseg")
    from mmengine.logging import HistoryBuffer

    from common.mmseg_plugin import mmengine_checkpoint_globals

    buf = io.BytesIO()
    torch.save({"message_hub": HistoryBuffer([1.0, 2.0], [1, 1])}, buf)
    with mmengine_checkpoint_globals():
        buf.seek(0)
        assert torch.load(buf, weights_only=True)["message_hub"].mean() == 1.5
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)
