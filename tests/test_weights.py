"""The one evaluation loader: every accepted checkpoint format, strict, with the allowed-missing list."""
import pytest
import torch

from models import build_student, build_vit, load_backbone
from models.errors import CheckpointError, MissingFileError


def _tiny(**kw):
    return build_vit("vit_tiny", img_size=56, depth=2, **kw)


@pytest.fixture
def student():
    torch.manual_seed(0)
    model = build_student("vit_small", img_size=224).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    return model


def _same_features(a, b, size=56):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(x)["patch"], b.forward_features(x)["patch"])


def test_loads_export_full_checkpoint_and_proteus_release(tmp_path, student):
    sd = student.state_dict()
    torch.save(sd, tmp_path / "student_backbone.pth")
    ema_sd = {k: v + 0.01 for k, v in sd.items()}
    torch.save({"student": sd, "student_ema": ema_sd, "epoch": 3}, tmp_path / "checkpoint.pth")
    # the original Proteus release: {"model": {"student.backbone.*", "token_head.*", ...}}
    release = {f"student.backbone.{k}": v for k, v in sd.items()}
    release["student.token_head.0.weight"] = torch.ones(384)
    torch.save({"model": release}, tmp_path / "proteus_release.pth")
    for name in ("student_backbone.pth", "checkpoint.pth", "proteus_release.pth"):
        _same_features(load_backbone(str(tmp_path / name), "vit_small"), student)
    ema = load_backbone(str(tmp_path / "checkpoint.pth"), "vit_small", ema=True)
    torch.testing.assert_close(ema.norm.weight, ema_sd["norm.weight"])
    with pytest.raises(CheckpointError, match="no `student_ema`"):
        load_backbone(str(tmp_path / "student_backbone.pth"), "vit_small", ema=True)


def test_official_518_checkpoint_is_resampled_and_mask_token_may_be_missing(tmp_path):
    official = build_vit("vit_small", img_size=518, num_register_tokens=4)
    sd = {k: v for k, v in official.state_dict().items() if k != "mask_token"}  # e.g. a timm export
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = load_backbone(str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), "vit_small", img_size=224)
    assert model.pos_embed.shape == (1, 257, 384) and model.num_register_tokens == 4
    assert not model.training
    _same_features(model, official.eval(), size=224)  # at 224, load-time resampling == run-time


def test_wrong_architecture_lists_the_problem(tmp_path, student):
    torch.save(student.state_dict(), tmp_path / "s.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit vit_base.*shape mismatches"):
        load_backbone(str(tmp_path / "s.pth"), "vit_base")
    sd = student.state_dict()
    sd["head.weight"] = torch.zeros(3)
    del sd["norm.bias"]
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"(?s)missing keys: norm\.bias.*unexpected keys: head\.weight"):
        load_backbone(str(tmp_path / "odd.pth"), "vit_small")


def test_random_init_baseline_and_size_overrides(tmp_path):
    model = load_backbone("none", "vit_tiny", img_size=56)
    assert model.embed_dim == 192 and not model.training
    tiny = _tiny(embed_dim=64, num_heads=2)
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    loaded = load_backbone(str(tmp_path / "tiny.pth"), "vit_tiny", img_size=56, depth=2, embed_dim=64, num_heads=2)
    _same_features(loaded, tiny.eval())


def test_timm_loads_our_export_with_its_own_converter(student):
    # the one-liner documented in the README: timm's DINOv2 model + its checkpoint filter
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    model.load_state_dict(checkpoint_filter_fn(student.state_dict(), model), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = student.forward_features(x)["cls"]
        theirs = model.eval().forward_features(x)[:, 0]
    assert (ours - theirs).abs().max() < 1e-4


def _proteus_training_checkpoint(student, path, args=None):
    """The original Proteus main.py's checkpoint.pth: the whole MetaArch, optimizer, timm schedule, args."""
    import argparse

    from timm.scheduler import CosineLRScheduler

    sd = student.state_dict()
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.ones(3)
    optimizer.step()
    args = args or argparse.Namespace(model="models_proteus_dinov2", target_model="vit_small", lr=5e-4,
                                      mask_ratio=(0.1, 0.5), opt_betas=None, output_dir="out", distributed=False)
    torch.save({"model": {**{f"student.backbone.{k}": v for k, v in sd.items()},
                          "student.token_head.0.weight": torch.ones(384)},
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": CosineLRScheduler(optimizer, t_initial=10).state_dict(),
                "epoch": 4, "model_ema": {k: v + 0.01 for k, v in sd.items()}, "scaler": {"scale": 65536.0},
                "args": args}, path)


def test_original_proteus_training_checkpoint_loads_with_the_safe_loader(tmp_path, student):
    import argparse
    import pathlib
    import pickle

    path = str(tmp_path / "checkpoint.pth")
    _proteus_training_checkpoint(student, path)
    _same_features(load_backbone(path, "vit_small"), student)
    ema = load_backbone(path, "vit_small", ema=True)
    torch.testing.assert_close(ema.norm.weight, student.norm.weight + 0.01)
    with pytest.raises(pickle.UnpicklingError):  # the Namespace was allowed for that load only
        torch.load(path, weights_only=True)
    # anything else the safe loader refuses: named, with the file
    odd = str(tmp_path / "odd.pth")
    _proteus_training_checkpoint(student, odd, args=argparse.Namespace(output_dir=pathlib.PurePosixPath("out")))
    with pytest.raises(CheckpointError, match=rf"refused to load {odd}: it holds pathlib\.PurePosixPath"):
        load_backbone(odd, "vit_small")


def test_every_file_failure_is_a_user_error(tmp_path, student):
    with pytest.raises(MissingFileError, match="checkpoint file not found: .*nope.pth"):
        load_backbone(str(tmp_path / "nope.pth"), "vit_small")
    torch.save(student.state_dict(), tmp_path / "s.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "s.pth").read_bytes()[:4000])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    for name in ("cut.pth", "junk.pth"):
        with pytest.raises(CheckpointError, match=rf"could not read checkpoint .*{name} \(truncated, corrupted"):
            load_backbone(str(tmp_path / name), "vit_small")
    with pytest.raises(CheckpointError, match=r"(?s)does not fit vit_base.*shape mismatches"):
        load_backbone(str(tmp_path / "s.pth"), "vit_base")
    with pytest.raises(CheckpointError, match=r"s\.pth: ema=True but the checkpoint holds no `student_ema`"):
        load_backbone(str(tmp_path / "s.pth"), "vit_small", ema=True)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        load_backbone(str(tmp_path / "tensor.pth"), "vit_small")
