"""Teachers: every family loads its official checkpoint format, is frozen, matches the reference code."""
import json
import os
import subprocess

import pytest
import torch

from models import build_teacher, build_vit, load_backbone
from models.errors import CheckpointError, ConfigError
from models.teachers import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TEACHER_FAMILIES
from tests.pretrain.helpers import run_module, tiny_args, tiny_data  # noqa: F401


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_dinov2_register_variant(tmp_path):
    sd = build_vit("vit_small", img_size=518, num_register_tokens=4).state_dict()
    torch.save(sd, tmp_path / "reg.pth")
    teacher = build_teacher("dinov2_vits14_reg", checkpoint=str(tmp_path / "reg.pth"))
    out = teacher(torch.randn(1, 3, 56, 56))
    assert out["patch"].shape == (1, 16, 384)  # registers are not patch tokens
    # loading a register checkpoint into the plain variant names the offending key
    with pytest.raises(ValueError, match="unexpected keys: register_tokens"):
        build_teacher("dinov2_vits14", checkpoint=str(tmp_path / "reg.pth"))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TOL = 1e-4  # max |diff| relative to the reference's max |value|


def rel_diff(got, ref):
    got, ref = got.detach(), ref.detach()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture
def tiny_row():
    """Register a tiny architecture under a family for one test; removed afterwards."""
    added = []

    def add(family, name, arch, patch, dim, **kw):
        TEACHER_FAMILIES[family].names[name] = (arch, patch, dim, kw)
        added.append((family, name))
        return name

    yield add
    for family, name in added:
        del TEACHER_FAMILIES[family].names[name]


def images(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=g)


def to_publisher_input(x, teacher):
    """The batch the publisher's model sees: our input is ImageNet-normalised, the teacher renormalises."""
    return x * teacher.scale + teacher.shift if teacher.renormalize else x


def save_safetensors(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# ---- DINOv3: transformers DINOv3ViTModel; Meta's .pth and the Hugging Face model.safetensors -------------
def hf_dinov3_to_meta(sd: dict) -> dict:
    """transformers DINOv3 keys -> Meta's release layout (the inverse of transformers' conversion script)."""
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"][0],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"], "rope_embed.periods": torch.ones(4)}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layer."))
    for i in range(depth):
        p, q = f"layer.{i}.", f"blocks.{i}."
        a = p + "attention."
        out[q + "attn.qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
        if a + "q_proj.bias" in sd:  # the 7B has no qkv bias at all
            out[q + "attn.qkv.bias"] = torch.cat([sd[a + "q_proj.bias"], torch.zeros_like(sd[a + "q_proj.bias"]),
                                                  sd[a + "v_proj.bias"]])
            out[q + "attn.qkv.bias_mask"] = torch.ones_like(out[q + "attn.qkv.bias"])
        out[q + "attn.proj.weight"], out[q + "attn.proj.bias"] = sd[a + "o_proj.weight"], sd[a + "o_proj.bias"]
        out[q + "ls1.gamma"], out[q + "ls2.gamma"] = sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"]
        for n in ("norm1", "norm2"):
            out[f"{q}{n}.weight"], out[f"{q}{n}.bias"] = sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"]
        gated = p + "mlp.gate_proj.weight" in sd  # H+ and 7B: SwiGLU, Meta's w1 (gate), w2 (up), w3 (down)
        names = (("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3")) if gated else \
            (("up_proj", "fc1"), ("down_proj", "fc2"))
        for src, dst in names:
            out[f"{q}mlp.{dst}.weight"], out[f"{q}mlp.{dst}.bias"] = sd[f"{p}mlp.{src}.weight"], sd[f"{p}mlp.{src}.bias"]
    return out


def make_hf_dinov3(**kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_register_tokens=4, patch_size=16, layerscale_value=0.5,
                                       **{"intermediate_size": 128, **kw})
    model = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm affine parameters
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dinov3():
    return make_hf_dinov3()


@pytest.mark.parametrize("layout", ["meta_pth", "hf_safetensors", "meta_pth_zero_qv_bias"])
def test_dinov3_equals_transformers(tmp_path, tiny_row, hf_dinov3, layout):
    name = tiny_row("dinov3", "dinov3_tiny", "vit_small_patch16_dinov3", 16, 64,
                    embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    if layout == "meta_pth_zero_qv_bias":  # the distilled releases: all-zero q/v biases, timm's bias-free model
        import copy

        hf_dinov3 = copy.deepcopy(hf_dinov3)
        with torch.no_grad():
            for n, p in hf_dinov3.named_parameters():
                if n.endswith(("q_proj.bias", "v_proj.bias")):
                    p.zero_()
    sd = hf_dinov3.state_dict()
    if layout.startswith("meta_pth"):
        path = tmp_path / "dinov3_tiny_pretrain.pth"
        torch.save(hf_dinov3_to_meta(sd), path)
    else:
        path = save_safetensors(sd, tmp_path / "model.safetensors")
    teacher = build_teacher(name, checkpoint=str(path))
    assert teacher.summary.startswith("the class token")
    for size in (64, 112):  # 4x4 and 7x7 patch grids: RoPE on a grid of another shape
        x = images(size)
        ref = hf_dinov3(pixel_values=to_publisher_input(x, teacher)).last_hidden_state
        out = teacher(x)
        assert out["patch"].shape == (2, (size // 16) ** 2, 64)
        assert rel_diff(out["cls"], ref[:, 0]) <= TOL, size
        assert rel_diff(out["patch"], ref[:, 5:]) <= TOL, size  # CLS + 4 registers excluded
        print(f"DINOv3 {layout} {size}px: cls {rel_diff(out['cls'], ref[:, 0]):.2e} "
              f"patch {rel_diff(out['patch'], ref[:, 5:]):.2e}")


@pytest.mark.parametrize("layout", ["meta_pth", "hf_safetensors"])
@pytest.mark.parametrize("arch", ["vit_huge_plus_patch16_dinov3", "vit_7b_patch16_dinov3"])
def test_dinov3_swiglu_sizes_equal_transformers(tmp_path, tiny_row, arch, layout):
    """H+/16 and 7B/16 differ from S..L by their SwiGLU MLP (Meta's w1/w2/w3, transformers' gated MLP)."""
    # as the publishers' configs: SiLU gate, hidden 64 x mlp_ratio 3 (aligned as timm does); the 7B without q/v bias
    seven_b = dict(query_bias=False, value_bias=False) if "7b" in arch else {}
    ref = make_hf_dinov3(use_gated_mlp=True, hidden_act="silu", intermediate_size=192, **seven_b)
    name = tiny_row("dinov3", "dinov3_tiny_swiglu", arch, 16, 64, embed_dim=64, depth=2, num_heads=4, mlp_ratio=3.0)
    sd = ref.state_dict()
    if layout == "meta_pth":
        path = tmp_path / "dinov3_tiny_swiglu_pretrain.pth"
        torch.save(hf_dinov3_to_meta(sd), path)
    else:
        path = save_safetensors(sd, tmp_path / "model.safetensors")
    teacher = build_teacher(name, checkpoint=str(path))
    for size in (64, 112):
        x = images(size)
        want = ref(pixel_values=to_publisher_input(x, teacher)).last_hidden_state
        out = teacher(x)
        print(f"DINOv3 {arch} {layout} {size}px: cls {rel_diff(out['cls'], want[:, 0]):.2e} "
              f"patch {rel_diff(out['patch'], want[:, 5:]):.2e}")
        assert rel_diff(out["cls"], want[:, 0]) <= TOL and rel_diff(out["patch"], want[:, 5:]) <= TOL, size


# ---- SigLIP2: transformers SiglipVisionModel (the fixed-resolution SigLIP2 checkpoints use it) -----------
@pytest.fixture(scope="module")
def hf_siglip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, image_size=64, patch_size=16)
    model = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("layout", ["hf_safetensors", "open_clip"])
def test_siglip2_equals_transformers(tmp_path, tiny_row, hf_siglip, layout):
    name = tiny_row("siglip2", "siglip2_tiny", "vit_base_patch16_siglip_224", 16, 64,
                    img_size=64, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    sd = {f"vision_model.{k}": v for k, v in hf_siglip.state_dict().items()}  # as in SiglipModel files
    path = save_safetensors(sd, tmp_path / "model.safetensors")
    if layout == "open_clip":  # open_clip's SigLIP2 = a timm trunk under visual.trunk.*
        teacher = build_teacher(name, checkpoint=path)
        trunk = {f"visual.trunk.{k}": v for k, v in teacher.backbone.model.state_dict().items()}
        path = tmp_path / "open_clip_model.pth"
        torch.save(trunk, path)
    teacher = build_teacher(name, checkpoint=str(path))
    assert "attention-pooling" in teacher.summary
    for size in (64, 128):  # 4x4 (native) and 8x8: the position embedding is interpolated
        x = images(size)
        ref = hf_siglip(pixel_values=to_publisher_input(x, teacher), interpolate_pos_encoding=size != 64)
        out = teacher(x)
        pooled, tokens = ref.pooler_output, ref.last_hidden_state
        print(f"SigLIP2 {layout} {size}px: cls {rel_diff(out['cls'], pooled):.2e} "
              f"patch {rel_diff(out['patch'], tokens):.2e}")
        assert rel_diff(out["cls"], pooled) <= TOL, size
        assert rel_diff(out["patch"], tokens) <= TOL, size
        assert rel_diff(out["cls"], tokens.mean(1)) > 0.1  # the pooled embedding, not the patch mean


# ---- AIMv2: transformers Aimv2VisionModel ------------------------------------------------------------------
def hf_aimv2(image_size, seed=0, **kw):
    """A tiny transformers AIMv2 vision tower with a fixed image_size (its own position table, as Apple's files)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Aimv2VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=image_size, patch_size=14,
                                         use_head=False, **kw)
    model = transformers.Aimv2VisionModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms; q/k and positions large enough that attention is not uniform
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.3)
            elif "position_embedding" in n:
                p.normal_(0, 0.5)
    return model


def aimv2_targets(ref_model, x, teacher):
    tokens = ref_model(pixel_values=to_publisher_input(x, teacher)).last_hidden_state
    return tokens.mean(1), tokens  # the summary: the mean of the final-norm patch tokens (timm's `avg` head)


def test_aimv2_equals_transformers_at_two_native_sizes_and_a_new_grid(tmp_path, tiny_row):
    kw = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    rows = {56: tiny_row("aimv2", "aimv2_tiny", "aimv2_large_patch14_224", 14, 64, img_size=56, **kw),
            84: tiny_row("aimv2", "aimv2_tiny_84", "aimv2_large_patch14_336", 14, 64, img_size=84, **kw)}
    refs, teachers = {}, {}
    # (a) Apple publishes one file per resolution, each with its own fixed table: 4x4 (56 px) and 6x6 (84 px)
    for size, name in rows.items():
        refs[size] = hf_aimv2(size, seed=size)
        path = save_safetensors(refs[size].state_dict(), tmp_path / f"aimv2_{size}.safetensors")
        teachers[size] = build_teacher(name, checkpoint=path)
        x = images(size)
        cls, patch = aimv2_targets(refs[size], x, teachers[size])
        out = teachers[size](x)
        print(f"AIMv2 hf_safetensors native {size}px: cls {rel_diff(out['cls'], cls):.2e} "
              f"patch {rel_diff(out['patch'], patch):.2e}")
        assert out["patch"].shape == (2, (size // 14) ** 2, 64)
        assert rel_diff(out["cls"], cls) <= TOL and rel_diff(out["patch"], patch) <= TOL, size
    # the 84 px file through the 56 px row: the model takes the file's 6x6 table (no resampling at load)
    other = build_teacher(rows[56], checkpoint=str(tmp_path / "aimv2_84.safetensors"))
    torch.testing.assert_close(other(images(84))["patch"], teachers[84](images(84))["patch"], rtol=0, atol=0)
    # (b) a new grid: the 56 px file's teacher at 84 px (6x6) against transformers built at 84 px holding the
    # stored 4x4 table resampled exactly as our teacher resamples it (timm's resample_abs_pos_embed defaults:
    # bicubic with antialias; Apple's code defines no resampling, its fixed-table model only runs at its size).
    # This checks everything at a new grid except the resampling formula itself, which is the same call.
    from timm.layers import resample_abs_pos_embed

    stored = refs[56].state_dict()
    table = stored["embeddings.position_embedding.weight"]
    new_grid = hf_aimv2(84)
    resampled = resample_abs_pos_embed(table[None], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=0)[0]
    new_grid.load_state_dict({**stored, "embeddings.position_embedding.weight": resampled})
    x = images(84)
    cls, patch = aimv2_targets(new_grid, x, teachers[56])
    out = teachers[56](x)
    print(f"AIMv2 hf_safetensors 56px file at 84px: cls {rel_diff(out['cls'], cls):.2e} "
          f"patch {rel_diff(out['patch'], patch):.2e}")
    assert rel_diff(out["cls"], cls) <= TOL and rel_diff(out["patch"], patch) <= TOL


def test_aimv2_native_resolution_file_is_refused_with_one_line(tmp_path, tiny_row):
    # transformers' `is_native` AIMv2 (apple/aimv2-large-patch14-native: 2-D sin-cos positions at any size, no
    # stored table) has no timm implementation to run it on
    name = tiny_row("aimv2", "aimv2_tiny", "aimv2_large_patch14_224", 14, 64,
                    img_size=56, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    path = save_safetensors(hf_aimv2(56, is_native=True).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="native-resolution AIMv2"):
        build_teacher(name, checkpoint=path)


# ---- timm:<SigLIP-family model>: the summary is the pooled embedding, not the patch mean -------------------
@pytest.mark.slow
def test_timm_siglip_summary_is_the_attention_pooled_embedding(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "siglip.pth")
    teacher = build_teacher("timm:vit_base_patch16_siglip_224", checkpoint=str(tmp_path / "siglip.pth"))
    assert "attention-pooling" in teacher.summary
    x = images(224)[:1]
    with torch.no_grad():
        tokens = ref.forward_features(x * teacher.scale + teacher.shift)
        pooled = ref.forward_head(tokens, pre_logits=True)
    out = teacher(x)
    torch.testing.assert_close(out["cls"], pooled)
    torch.testing.assert_close(out["patch"], tokens)
    assert rel_diff(out["cls"], tokens.mean(1)) > 0.1


def test_generic_timm_without_class_token_or_pool_head_states_its_summary():
    teacher = build_teacher("timm:vit_base_patch16_siglip_gap_224", random_weights=True)
    assert "no class token and no pooling head" in teacher.summary and "avg" in teacher.summary


# ---- no file, no network: one line, exit 2 ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["timm:vit_small_patch16_224", "dinov3_vitb16", "siglip2_vitb16"])
def test_missing_teacher_file_offline_is_one_line_exit_2(tmp_path, tiny_data, teacher):
    argv = tiny_args(tiny_data, "", str(tmp_path / "out"), teacher=teacher, input_size=64, patch_size=16)
    res = run_module(argv, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    err = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "--teacher-checkpoint" in err[0] and ("huggingface.co" in err[0] or "timm/" in err[0]), err[0]


def test_unknown_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown teacher"):
        build_teacher("dinov3_vitz16")


# ---- DINOv3 + SigLIP2 at once: PHI-S, /16 teachers on a /14 student's grid, kill -9 and a bitwise resume ---
TINY_ROWS = {"dinov3": ("dinov3_tiny", ("vit_small_patch16_dinov3", 16, 64,
                                        dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0))),
             "siglip2": ("siglip2_tiny", ("vit_base_patch16_siglip_224", 16, 64,
                                          dict(img_size=64, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)))}


RUNNER = f"""
import sys
sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests")!r}]
from tests import fault_injection
from models.teachers import TEACHER_FAMILIES
for family, (name, row) in {TINY_ROWS!r}.items():
    TEACHER_FAMILIES[family].names[name] = row
sys.exit(fault_injection.main(sys.argv[1:]))
"""  # the tiny rows exist in this process only; fault_injection kills it after a step


@pytest.fixture
def tiny_modern_teachers(tmp_path, tiny_row, hf_dinov3, hf_siglip):
    for family, (name, (arch, patch, dim, kw)) in TINY_ROWS.items():
        tiny_row(family, name, arch, patch, dim, **kw)
    d3 = save_safetensors(hf_dinov3.state_dict(), tmp_path / "dinov3.safetensors")
    sl = save_safetensors({f"vision_model.{k}": v for k, v in hf_siglip.state_dict().items()},
                          tmp_path / "siglip2.safetensors")
    return f"{d3},{sl}"


@pytest.mark.slow
def test_dinov3_and_siglip2_train_log_each_and_resume_bitwise_after_kill9(tmp_path, tiny_data, tiny_modern_teachers):
    from pretrain import main as pretrain_main
    from tests.pretrain.helpers import PYTHON, read_log, train_losses

    def argv(out):  # 112 px: the /16 teachers give 7x7, resampled to the /14 student's 8x8 grid
        return tiny_args(tiny_data, tiny_modern_teachers, out, teacher="dinov3_tiny,siglip2_tiny", input_size=112,
                         teacher_weight="1,0.5", teacher_norm_batches=2, pca_every_epochs=0, epochs=1)

    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert pretrain_main.main(argv(ref_out)) == 0
    rows = [r for r in read_log(ref_out) if "train/loss" in r]
    for t in ("dinov3_tiny", "siglip2_tiny"):
        for o in ("token", "fea", "patch"):
            assert all(torch.isfinite(torch.tensor(r[f"train/{t}/{o}"])) for r in rows), (t, o)
    cfg = json.load(open(os.path.join(ref_out, "config.json")))
    assert "attention-pooling" in cfg["teacher_summary"]["siglip2_tiny"]
    assert cfg["teacher_summary"]["dinov3_tiny"].startswith("the class token")
    ckpt = torch.load(os.path.join(ref_out, "checkpoint.pth"), weights_only=True)
    assert ckpt["target_norm"]["norms.siglip2_tiny/cls.fitted"]  # PHI-S per teacher

    killed = subprocess.run([PYTHON, "-c", RUNNER, "--kill-at-step", "4", "--", *argv(out)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                 "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert pretrain_main.main(argv(out)) == 0
    got = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    for k in ckpt["student"]:
        assert torch.equal(ckpt["student"][k], got["student"][k]), k
    assert train_losses(out)[6] == train_losses(ref_out)[6]


@pytest.mark.slow
def test_input_size_rule_before_any_weights_load(tmp_path, tiny_data):
    res = run_module(tiny_args(tiny_data, "/nonexistent/dinov3.pth,/nonexistent/siglip.safetensors",
                               str(tmp_path / "o"), teacher="dinov3_vitb16,siglip2_vitb16", input_size=56), timeout=300)
    assert res.returncode == 2 and "patch size 16" in res.stderr and "nonexistent" not in res.stderr, res.stderr


# ---- PE-core: Meta's PE-Core-*.pt layout; the reference is our own plain-torch forward of Meta's code ------
def timm_pe_to_meta(sd: dict) -> dict:
    """timm's PE keys -> Meta's release layout (the inverse of timm's _convert_pe), under `visual.`."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            k, v = "class_embedding", v[0, 0]
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        elif k.startswith("attn_pool."):
            if k.startswith(("attn_pool.q.", "attn_pool.kv.")):
                continue
            k = (k.replace("attn_pool.latent", "attn_pool.probe").replace("attn_pool.proj", "attn_pool.attn.out_proj")
                 .replace("attn_pool.norm", "attn_pool.layernorm").replace("mlp.fc1", "mlp.c_fc")
                 .replace("mlp.fc2", "mlp.c_proj"))
        else:
            k = (k.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre").replace("blocks.", "transformer.resblocks.")
                 .replace("norm1", "ln_1").replace("norm2", "ln_2").replace("attn.qkv.", "attn.in_proj_")
                 .replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
                 .replace("gamma_1", "ls_1.gamma").replace("gamma_2", "ls_2.gamma"))
            k = "ln_post." + k[len("norm."):] if k.startswith("norm.") else k
        out["visual." + k] = v
    for t in ("weight", "bias"):
        out[f"visual.attn_pool.attn.in_proj_{t}"] = torch.cat([sd[f"attn_pool.q.{t}"], sd[f"attn_pool.kv.{t}"]])
    out["visual.proj"] = torch.randn(sd["norm.weight"].shape[0], 32)  # into the text space: not a target
    return out


PE_VARIANTS = {  # timm architecture, patch, tiny kwargs; the test's random weights come from this timm model
    "cls": ("vit_pe_core_base_patch16_224", 16, {}),  # T/S/B/L: class token, RoPE grid from (1, 1)
    "no_cls": ("vit_pe_core_gigantic_patch14_448", 14, {}),  # G14: no class token, RoPE grid from (0, 0)
    "layerscale": ("vit_pe_core_base_patch16_224", 16, {"init_values": 0.5}),  # ls_1/ls_2.gamma (PE-lang style)
}


@pytest.mark.parametrize("variant", list(PE_VARIANTS))
def test_pe_core_meta_layout_equals_reference_forward(tmp_path, tiny_row, variant):
    """Our teacher (timm's PE, loaded from Meta's PE-Core-*.pt layout) against tests/models/pe_reference.py, a
    plain-torch forward of Meta's perception_models code computed from the same Meta-layout state dict."""
    import timm

    from tests.models.pe_reference import pe_core_forward

    arch, patch, extra = PE_VARIANTS[variant]
    native = 4 * patch
    kw = dict(img_size=native, embed_dim=64, depth=2, num_heads=4, **extra)
    name = tiny_row("pe_core", "pe_core_tiny", arch, patch, 64, **kw)
    torch.manual_seed(0)
    gen = timm.create_model(arch, pretrained=False, num_classes=0, **kw)  # only a source of random weights
    with torch.no_grad():  # non-trivial biases, norms, layer scales, class and position embeddings; q/k large
        for n, p in gen.named_parameters():  # enough that attention is far from uniform (RoPE, positions matter)
            if n.endswith(("qkv.weight", "q.weight", "kv.weight")):
                p.normal_(0, 0.3)
            else:
                p.add_(torch.randn_like(p) * (0.1 if n.endswith("bias") or "norm" in n or "gamma" in n else 0.02))
    meta = timm_pe_to_meta(gen.state_dict())
    assert ("visual.class_embedding" in meta) == (variant != "no_cls")
    assert any(".ls_1.gamma" in k for k in meta) == (variant == "layerscale")
    torch.save(meta, tmp_path / "PE-Core-tiny.pt")
    teacher = build_teacher(name, checkpoint=str(tmp_path / "PE-Core-tiny.pt"))
    assert "attention-pooling" in teacher.summary
    for size in (native, native + 2 * patch):  # the stored 4x4 grid, and 6x6: position table + RoPE resampled
        x = images(size)
        pooled, tokens = pe_core_forward(meta, to_publisher_input(x, teacher), num_heads=4)
        out = teacher(x)
        assert out["patch"].shape == tokens.shape == (2, (size // patch) ** 2, 64)
        print(f"PE-core meta_pt {variant} {size}px: cls {rel_diff(out['cls'], pooled):.2e} "
              f"patch {rel_diff(out['patch'], tokens):.2e}")
        assert rel_diff(out["cls"], pooled) <= TOL and rel_diff(out["patch"], tokens) <= TOL, size
        assert rel_diff(out["cls"], tokens.mean(1)) > 0.1  # the pooled embedding, not the patch mean


# ---- C-RADIO: transformers 5.23 RadioModel (its own CPE patch generator, summary and features); NVIDIA's
# trust_remote_code layout and the transformers-native one ------------------------------------------------------
RADIO_ARCHS = {"v4": "naflexvit_huge_patch16_radio_v4",  # no LayerScale: transformers' lambda1 stays ones
               "v3_l": "naflexvit_large_patch16_radio_v3"}  # LayerScale (NVIDIA's `grandma`): lambda1 perturbed
# 3 summary tokens + 2 registers = timm's class token + 4 "registers"; max_img_size 128 / 16 = the 8x8 stored grid
RADIO_TINY = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, reg_tokens=4, pos_embed_grid_size=(8, 8))


def hf_radio(layer_scale: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.RadioConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0,
                                   patch_size=16, max_img_size=128, num_cls_tokens=3, num_registers=2,
                                   summary_idxs=[0, 2], norm_mean=[0.45, 0.4, 0.5], norm_std=[0.3, 0.25, 0.2])
    model = transformers.RadioModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or (layer_scale and "lambda1" in n):
                p.add_(torch.randn_like(p) * 0.1)
            elif n in ("embeddings.position_embedding", "embeddings.cls_register_token"):
                p.add_(torch.randn_like(p))  # large: a wrong resampling or token order shows
    return model


def radio_nvidia_layout(sd: dict, layer_scale: bool) -> dict:
    """transformers RadioModel keys -> NVIDIA's release layout (RADIOModel: `radio_model.model` is a timm ViT whose
    patch_generator holds the CPE; LayerScale renamed `grandma`), with a teacher adaptor the loader must drop."""
    out = {}
    for k, v in sd.items():
        if ".attention." in k and "o_proj" not in k or ("lambda1" in k and not layer_scale):
            continue  # q/k/v are fused below; without LayerScale the lambdas are ones (asserted)
        k = (k.replace("embeddings.patch_projection", "model.patch_generator.embedder")
             .replace("embeddings.position_embedding", "model.patch_generator.pos_embed")
             .replace("embeddings.cls_register_token", "model.patch_generator.cls_token.token")
             .replace("encoder.layer.", "model.blocks.").replace("attention.o_proj", "attn.proj")
             .replace("layer_scale1.lambda1", "ls1.grandma").replace("layer_scale2.lambda1", "ls2.grandma"))
        out["radio_model." + k] = v
    for i in range(2):
        a = f"encoder.layer.{i}.attention."
        for t in ("weight", "bias"):
            out[f"radio_model.model.blocks.{i}.attn.qkv.{t}"] = torch.cat([sd[f"{a}{n}_proj.{t}"] for n in "qkv"])
        assert layer_scale or all(bool((sd[f"encoder.layer.{i}.layer_scale{j}.lambda1"] == 1).all()) for j in (1, 2))
    out["radio_model.adaptors.clip.summary.fc1.weight"] = torch.randn(8, 64)  # a teacher head: not a target
    return out


def radio_pixels(h, w, seed=0):
    """(our ImageNet-normalised batch (2, 3, h, w), the same images as pixels in [0, 1]-ish for RadioModel,
    which normalises them with its own input conditioner)."""
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return x, x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("arch", list(RADIO_ARCHS))
@pytest.mark.parametrize("layout", ["nvidia_safetensors", "hf_safetensors"])
def test_c_radio_equals_transformers_radio_model(tmp_path, tiny_row, arch, layout):
    ref_model = hf_radio(layer_scale=arch == "v3_l")
    name = tiny_row("c_radio", "c_radio_tiny", RADIO_ARCHS[arch], 16, 64, **RADIO_TINY)
    sd = ref_model.state_dict()
    if layout == "nvidia_safetensors":
        sd = radio_nvidia_layout(sd, arch == "v3_l")
    path = save_safetensors(sd, tmp_path / "model.safetensors")
    teacher = build_teacher(name, checkpoint=path)
    assert teacher.summary_dim == 2 * 64 and "[0, 2] concatenated" in teacher.summary
    assert teacher.mean == pytest.approx((0.45, 0.4, 0.5)) and teacher.std == pytest.approx((0.3, 0.25, 0.2))
    # 128 px: the stored 8x8 grid; 96x160: 6x10, the table resampled to 10x10 (bilinear) and cropped top-left
    for h, w in ((128, 128), (96, 160)):
        x, pixels = radio_pixels(h, w)
        with torch.no_grad():
            ref = ref_model(pixel_values=pixels)
        out = teacher(x)
        print(f"C-RADIO {arch} {layout} {h}x{w}: summary {rel_diff(out['cls'], ref.summary):.2e} "
              f"patch {rel_diff(out['patch'], ref.features):.2e}")
        assert out["patch"].shape == (2, h * w // 256, 64)
        assert rel_diff(out["cls"], ref.summary) <= TOL and rel_diff(out["patch"], ref.features) <= TOL
    one = build_teacher(name, checkpoint=path, summary_index=1)  # the second of summary_idxs: token 2
    assert one.summary_dim == 64 and one.summary == "summary token 2"
    torch.testing.assert_close(one(x)["cls"], ref.summary[:, 64:], atol=TOL * float(ref.summary.abs().max()), rtol=0)
    with pytest.raises(ConfigError, match="summary index 2 out of range.*summary_idxs \\[0, 2\\]"):
        build_teacher(name, checkpoint=path, summary_index=2)


def test_c_radio_file_of_another_model_or_without_summary_idxs_is_refused(tmp_path, tiny_row):
    from models.errors import CheckpointError

    sd = radio_nvidia_layout(hf_radio(layer_scale=False).state_dict(), False)
    path = save_safetensors(sd, tmp_path / "model.safetensors")
    other = tiny_row("c_radio", "c_radio_tiny_reg2", RADIO_ARCHS["v4"], 16, 64, **{**RADIO_TINY, "reg_tokens": 2})
    with pytest.raises(CheckpointError, match="5 summary/register tokens and 64 stored positions, but teacher row "
                                              "expects 3 and 8x8"):
        build_teacher(other, checkpoint=path)
    name = tiny_row("c_radio", "c_radio_tiny", RADIO_ARCHS["v4"], 16, 64, **RADIO_TINY)
    del sd["radio_model.summary_idxs"]
    with pytest.raises(CheckpointError, match="no valid `summary_idxs`"):
        build_teacher(name, checkpoint=save_safetensors(sd, tmp_path / "no_idx.safetensors"))
    with pytest.raises(CheckpointError, match="neither NVIDIA's C-RADIO"):
        build_teacher(name, checkpoint=save_safetensors({"foo": torch.zeros(1)}, tmp_path / "other.safetensors"))


@pytest.mark.slow
def test_c_radio_summary_distilled_concatenated_or_one_token(tmp_path, tiny_data, tiny_row, capsys):
    """pretrain.main with a tiny C-RADIO teacher (NVIDIA's layout): the token head predicts the concatenated
    summary (2 x 64) or the one token --teacher-summary-index names (64); PHI-S fitted per part."""
    from pretrain import main as pretrain_main
    from tests.pretrain.helpers import read_log

    name = tiny_row("c_radio", "c_radio_tiny", RADIO_ARCHS["v4"], 16, 64, **RADIO_TINY)
    path = save_safetensors(radio_nvidia_layout(hf_radio(False).state_dict(), False), tmp_path / "model.safetensors")

    def argv(out, summary):  # 64 px /16: the teacher's 4x4 grid is the student's
        return tiny_args(tiny_data, path, out, teacher=name, input_size=64, patch_size=16, epochs=1,
                         pca_every_epochs=0, teacher_norm="phi-s", teacher_norm_batches=2,
                         teacher_summary_index=summary)

    for summary, width, words in (("all", 128, "summary tokens [0, 2] concatenated (2 x 64)"),
                                  ("1", 64, "summary token 2")):
        out = str(tmp_path / summary)
        assert pretrain_main.main(argv(out, summary)) == 0
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
        heads = {h: tuple(ckpt["heads"][f"{h}_head"]["1.weight"].shape) for h in ("token", "fea", "patch")}
        assert heads == {"token": (width, 64), "fea": (64, 64), "patch": (64, 64)}, heads
        norm = ckpt["target_norm"]
        assert norm["norms.c_radio_tiny/cls.rotation"].shape == (width, width)
        assert norm["norms.c_radio_tiny/patch.rotation"].shape == (64, 64)
        assert norm["norms.c_radio_tiny/cls.fitted"] and norm["norms.c_radio_tiny/patch.fitted"]
        rows = [r for r in read_log(out) if "train/loss" in r]
        for o in ("token", "fea", "patch"):
            assert rows and all(torch.isfinite(torch.tensor(r[f"train/c_radio_tiny/{o}"])) for r in rows), o
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["teacher_summary_index"] == summary and cfg["teacher_summary"] == {name: words}
    # must-match on resume: the other summary is another run
    capsys.readouterr()
    assert pretrain_main.main(argv(str(tmp_path / "1"), "all")) == 2
    assert "teacher_summary_index: checkpoint '1', now 'all'" in capsys.readouterr().err


@pytest.mark.parametrize("family,arch,sd", [
    ("dinov3", "vit_small_patch16_dinov3", {"embeddings.cls_token": torch.zeros(1, 1, 64),
                                            "layer.0.norm1.weight": torch.ones(64)}),
    ("siglip2", "vit_base_patch16_siglip_224",
     {"vision_model.embeddings.patch_embedding.weight": torch.zeros(64, 3, 16, 16)}),
    ("aimv2", "aimv2_large_patch14_224", {"embeddings.patch_embed.weight": torch.zeros(64, 3, 14, 14),
                                          "embeddings.rms_norm.weight": torch.ones(64),
                                          "embeddings.position_embedding.weight": torch.zeros(16, 64)}),
    ("c_radio", "naflexvit_base_patch16_radio_v3", {"embeddings.cls_register_token": torch.zeros(4, 64),
                                                    "embeddings.patch_projection.weight": torch.zeros(64, 768)}),
])
def test_truncated_transformers_layout_file_is_one_checkpoint_error(tmp_path, tiny_row, family, arch, sd):
    """A file in a family's transformers layout with keys missing names the first missing key (no KeyError)."""
    from models.errors import CheckpointError

    patch = 14 if family == "aimv2" else 16
    name = tiny_row(family, f"{family}_cut", arch, patch, 64, embed_dim=64, depth=2, num_heads=4)
    path = save_safetensors(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no `.*`: not a complete transformers"):
        build_teacher(name, checkpoint=path)
