"""The one evaluation loader: every accepted checkpoint format, strict, with the allowed-missing list."""
import os
import pickle
import zipfile

import pytest
import torch

from models import build_student, build_teacher, build_vit, load_backbone, read_checkpoint
from models.errors import CheckpointError, MissingFileError, UserError


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

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) creates the file `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.written = torch.zeros(4, dtype=torch.uint8)

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]):
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        self.written = torch.from_file(self.marker, True, 4, dtype=torch.uint8).fill_(65)  # creates the file


class PickledPayload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torchscript_payload(tmp_path, name: str) -> tuple[str, str]:
    marker = str(tmp_path / f"{name}.marker")
    path = str(tmp_path / f"{name}.pt")
    torch.jit.script(ScriptedPayload(marker)).save(path)
    return path, marker


def _pickled_payload(tmp_path, name: str) -> tuple[str, str]:
    marker = str(tmp_path / f"{name}.marker")
    path = str(tmp_path / f"{name}.pth")
    torch.save({"model": {"w": torch.ones(1)}, "extra": PickledPayload(marker)}, path)
    return path, marker


def test_the_payloads_are_live(tmp_path):
    path, marker = _torchscript_payload(tmp_path, "live_ts")
    torch.jit.load(path)  # what the old fallback did
    assert os.path.exists(marker)
    path, marker = _pickled_payload(tmp_path, "live_pickle")
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_torchscript_payload_never_runs(tmp_path):
    path, marker = _torchscript_payload(tmp_path, "ts")
    with pytest.raises(CheckpointError, match="without running its code"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_backbone(path, "vit_tiny", img_size=28, depth=1)
    with pytest.raises(CheckpointError):
        build_teacher("clip_vitb16", checkpoint=path)
    assert not os.path.exists(marker)


def test_torchscript_archive_with_a_pickled_global_is_refused(tmp_path):
    # a TorchScript-shaped zip whose data.pkl calls os.system: refused by name, nothing run
    marker = tmp_path / "crafted.marker"
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("crafted/data.pkl", pickle.dumps(PickledPayload(str(marker)), protocol=2))
        zf.writestr("crafted/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("crafted/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        zf.writestr("crafted/version", "3\n")
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system.*nothing was run"):
        read_checkpoint(str(path))
    assert not marker.exists()


def test_pickled_payload_is_refused_naming_the_file_and_the_global(tmp_path):
    path, marker = _pickled_payload(tmp_path, "pickle")
    for load in (lambda: read_checkpoint(path), lambda: load_backbone(path, "vit_tiny", img_size=28, depth=1),
                 lambda: build_teacher("dinov2_vits14", checkpoint=path)):
        with pytest.raises(CheckpointError, match=rf"(?s)refused to load {path}.*(posix|os)\.system.*plain state dict"):
            load()
    assert not os.path.exists(marker)


class _TinyClip(torch.nn.Module):
    """OpenAI-like layout: visual.* parameters, a buffer, a plain tensor attribute (not in a state dict)."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.conv1 = torch.nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.visual.ln_post = torch.nn.LayerNorm(8)
        self.visual.class_embedding = torch.nn.Parameter(torch.randn(8))
        self.register_buffer("counts", torch.arange(5))
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        self.attn_mask = torch.full((2, 2), float("-inf"))

    def forward(self, x):
        tokens = self.visual.conv1(x).flatten(2).transpose(1, 2) + self.visual.class_embedding
        return self.visual.ln_post(tokens).sum() * self.logit_scale + self.attn_mask.sum() * 0


@pytest.mark.parametrize("how", ["trace", "script_fp16"])
def test_genuine_torchscript_archive_gives_its_exact_tensors(tmp_path, how):
    torch.manual_seed(0)
    module = _TinyClip().eval()
    if how == "trace":
        archive = torch.jit.trace(module, torch.randn(1, 3, 8, 8))
    else:  # OpenAI's CLIP files hold fp16 weights
        archive = torch.jit.script(module.half())
    path = str(tmp_path / f"{how}.pt")
    archive.save(path)
    want = torch.jit.load(path).state_dict()  # our own archive: safe to run here, as the reference
    got = read_checkpoint(path)
    assert list(got) == list(want) and "visual.conv1.weight" in got and "attn_mask" not in got
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_poisoned_hub_cache_is_refused_without_network(tmp_path, monkeypatch):
    # the default DINOv2 download: a file already in torch.hub's cache under the URL's name is used as is
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("network touched"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "hub.marker"
    torch.save({"pos_embed": PickledPayload(str(marker))}, cache / "dinov2_vits14_pretrain.pth")
    with pytest.raises(CheckpointError, match=r"(?s)dinov2_vits14_pretrain\.pth.*(posix|os)\.system"):
        build_teacher("dinov2_vits14")
    torch.jit.script(ScriptedPayload(str(marker))).save(str(cache / "dinov2_vitb14_pretrain.pth"))
    with pytest.raises(UserError):
        build_teacher("dinov2_vitb14")
    assert not marker.exists()
