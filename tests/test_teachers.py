"""Teachers: every family loads its official checkpoint format, is frozen, matches the reference code."""
import os

import pytest
import torch

from models import build_teacher, build_vit, load_backbone
from models.teachers import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _assert_frozen(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.backbone.training


@pytest.fixture(scope="module")
def official_vits14(tmp_path_factory):
    """An official-format dinov2_vits14 file (random weights) and the official model holding them."""
    vits = pytest.importorskip("dinov2.models.vision_transformer")
    torch.manual_seed(0)
    ref = vits.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()
    with torch.no_grad():  # official init leaves LayerScale at 1 and biases at 0: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def test_dinov2_teacher_equals_official_implementation_at_224(official_vits14):
    ref, path = official_vits14
    teacher = build_teacher("dinov2_vits14", checkpoint=path)
    _assert_frozen(teacher)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref.forward_features(x)
    got = teacher(x)
    assert got["cls"].shape == (2, 384) and got["patch"].shape == (2, 256, 384)
    assert (got["cls"] - want["x_norm_clstoken"]).abs().max() <= 1e-4
    assert (got["patch"] - want["x_norm_patchtokens"]).abs().max() <= 1e-4
    assert teacher.embed_dim == 384 and teacher.patch_size == 14


def test_dinov2_intermediate_layers_equal_official(official_vits14):
    ref, path = official_vits14
    model = load_backbone(path, "vit_small", img_size=224)  # pos-embed resampled 518 -> 224 at load
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
        got = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
    for (gp, gc), (wp, wc) in zip(got, want):
        assert (gp - wp).abs().max() <= 1e-4 and (gc - wc).abs().max() <= 1e-4


def test_dinov2_giant_swiglu_block_equals_official():
    vits = pytest.importorskip("dinov2.models.vision_transformer")
    ref = vits.DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                                     init_values=1.0, ffn_layer="swiglufused", block_chunks=0).eval()
    ours = build_vit("vit_giant2", img_size=518, embed_dim=64, depth=2, num_heads=2).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        diff = (ours.forward_features(x)["patch"] - ref.forward_features(x)["x_norm_patchtokens"]).abs().max()
    assert diff <= 1e-5


def test_dinov2_register_variant(tmp_path):
    sd = build_vit("vit_small", img_size=518, num_register_tokens=4).state_dict()
    torch.save(sd, tmp_path / "reg.pth")
    teacher = build_teacher("dinov2_vits14_reg", checkpoint=str(tmp_path / "reg.pth"))
    out = teacher(torch.randn(1, 3, 56, 56))
    assert out["patch"].shape == (1, 16, 384)  # registers are not patch tokens
    # loading a register checkpoint into the plain variant names the offending key
    with pytest.raises(ValueError, match="unexpected keys: register_tokens"):
        build_teacher("dinov2_vits14", checkpoint=str(tmp_path / "reg.pth"))


def test_missing_corrupt_and_mismatched_files_give_clear_errors(tmp_path, official_vits14):
    with pytest.raises(FileNotFoundError, match="(?s)nope.pth.*dl.fbaipublicfiles.com"):
        build_teacher("dinov2_vits14", checkpoint=str(tmp_path / "nope.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(open(official_vits14[1], "rb").read()[:5000])
    with pytest.raises(ValueError, match="truncated, corrupted or not a PyTorch file"):
        build_teacher("dinov2_vits14", checkpoint=str(broken))
    with pytest.raises(ValueError, match=r"shape mismatches: blocks\.0\.attn\.proj\.bias: checkpoint \(384,\) "
                                         r"vs model \(768,\)"):
        build_teacher("dinov2_vitb14", checkpoint=official_vits14[1])
    with pytest.raises(ValueError, match="unknown teacher 'dinov3'"):
        build_teacher("dinov3")


@pytest.fixture(scope="module")
def clip_tower():
    """OpenAI's own CLIP ViT-B/16 image tower with random (perturbed) weights: the reference."""
    clip_model = pytest.importorskip("clip.model")
    torch.manual_seed(0)
    ref = clip_model.VisionTransformer(input_resolution=224, patch_size=16, width=768, layers=12, heads=12,
                                       output_dim=512).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def test_clip_teacher_equals_openai_reference(tmp_path, clip_tower):
    torch.save({f"visual.{k}": v for k, v in clip_tower.state_dict().items()}, tmp_path / "clip.pth")
    teacher = build_teacher("clip_vitb16", checkpoint=str(tmp_path / "clip.pth"))
    _assert_frozen(teacher)
    x = torch.randn(2, 3, 224, 224)  # ImageNet-normalised, as the student sees it
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    x_clip = (pixels - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    captured = {}
    hook = clip_tower.ln_post.register_forward_hook(lambda m, i, o: captured.setdefault("cls", o))
    with torch.no_grad():
        clip_tower(x_clip)  # OpenAI applies ln_post to CLS only, then projects; we want ln_post(CLS)
    hook.remove()
    got = teacher(x)
    assert got["cls"].shape == (2, 768) and got["patch"].shape == (2, 196, 768)
    assert (got["cls"] - captured["cls"]).abs().max() <= 1e-4
    assert teacher(torch.randn(1, 3, 112, 112))["patch"].shape == (1, 49, 768)  # other sizes work


def test_clip_bare_tower_without_proj_and_torchscript_archive(tmp_path, clip_tower):
    # the original Proteus saved the visual tower without its `visual.` prefix and without `proj`
    torch.save({k: v for k, v in clip_tower.state_dict().items() if k != "proj"}, tmp_path / "bare.pth")
    x = torch.randn(1, 3, 224, 224)
    bare = build_teacher("clip_vitb16", checkpoint=str(tmp_path / "bare.pth"))(x)["cls"]

    class FullClip(torch.nn.Module):  # OpenAI's .pt archives hold the whole CLIP: keys visual.*
        def __init__(self):
            super().__init__()
            self.visual = clip_tower

        def forward(self, x):
            return self.visual(x)

    scripted = torch.jit.trace(FullClip(), x)
    scripted.save(str(tmp_path / "ViT-B-16.pt"))
    archived = build_teacher("clip_vitb16", checkpoint=str(tmp_path / "ViT-B-16.pt"))(x)["cls"]
    torch.testing.assert_close(bare, archived)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an OpenAI CLIP image tower"):
        build_teacher("clip_vitb16", checkpoint=str(tmp_path / "other.pth"))


def test_synclr_release_format(tmp_path):
    model = build_vit("vit_base", patch_size=16, img_size=224, init_values=None)
    sd = {f"module.visual.{k}": v for k, v in model.state_dict().items() if k != "mask_token"}
    sd["module.visual.mask_token"] = torch.zeros(1, 1, 768)  # SynCLR's own (unused) mask token shape
    sd["module.visual.head.weight"] = torch.zeros(10, 768)
    torch.save({"model": sd}, tmp_path / "synclr.pth")
    teacher = build_teacher("synclr_vitb16", checkpoint=str(tmp_path / "synclr.pth"))
    _assert_frozen(teacher)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x)["patch"], model.eval().forward_features(x)["patch"])


def test_timm_teacher_from_local_file(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    teacher = build_teacher("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "tiny.pth"))
    out = teacher(torch.randn(1, 3, 224, 224))
    assert out["cls"].shape == (1, 192) and out["patch"].shape == (1, 196, 192)
    _assert_frozen(teacher)


def test_teacher_renormalisation_is_exact():
    # CLIP's constants: x_clip = x * scale + shift must equal the two-step un/re-normalisation
    from models.teachers import Teacher

    t = Teacher(torch.nn.Identity(), 3, 1, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    x = torch.randn(2, 3, 4, 4)
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    want = (pixels - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x * t.scale + t.shift, want)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
