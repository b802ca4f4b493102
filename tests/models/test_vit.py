"""The student ViT: factories, gradients, masking semantics, DINOv2 key layout, feature API."""
import pytest
import torch

from models import VIT_SIZES, build_student, build_vit
from models.pos_embed import resample_patch_pos_embed

TINY = dict(depth=2)  # full widths, two blocks: every factory's real width/heads, still fast on CPU


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base", "vit_large"])
def test_every_student_trains_forward_backward(name):
    model = build_student(name, patch_size=14, img_size=56, **TINY)
    dim = VIT_SIZES[name][0]
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True  # the mask token must get a gradient too
    out = model.forward_features(x, masks=masks)
    assert out["cls"].shape == (2, dim) and out["patch"].shape == (2, 16, dim)
    (out["cls"].square().mean() + out["patch"].square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_full_size_parameter_counts():
    # ViT-S/14 at 224 as in DINOv2 (21.6M incl. the 257-row pos-embed and the mask token)
    assert sum(p.numel() for p in build_student("vit_small").parameters()) == 21_629_184
    with torch.device("meta"):  # shapes only: no 300M-parameter init on the CPU
        large = build_student("vit_large", patch_size=14)
    assert len(large.blocks) == 24 and sum(p.numel() for p in large.parameters()) == 303_228_928


def test_unknown_student_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown student 'vit_huge'"):
        build_student("vit_huge")


def test_masked_forward_semantics():
    model = build_student("vit_tiny", img_size=56, depth=2).eval()
    with torch.no_grad():
        model.mask_token.normal_()  # zero-init would hide whether masking does anything
        x = torch.randn(2, 3, 56, 56)
        plain = model.forward_features(x)
        empty = model.forward_features(x, masks=torch.zeros(2, 16, dtype=torch.bool))
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[1, 3] = True
        masked = model.forward_features(x, masks=masks)
    torch.testing.assert_close(empty["patch"], plain["patch"], rtol=0, atol=0)
    torch.testing.assert_close(masked["patch"][0], plain["patch"][0], rtol=0, atol=0)  # sample 0 untouched
    assert (masked["patch"][1] - plain["patch"][1]).abs().max() > 1e-3


def test_mask_replaces_the_patch_embedding_before_positions():
    model = build_student("vit_tiny", img_size=56, depth=1)
    with torch.no_grad():
        model.mask_token.fill_(0.5)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 7] = True
    tokens = model.prepare_tokens(torch.randn(1, 3, 56, 56), masks)  # (1, 1 + 16, D)
    expected = 0.5 + model.pos_embed[0, 1 + 7]
    torch.testing.assert_close(tokens[0, 1 + 7], expected)


@pytest.mark.slow
def test_state_dict_keys_equal_official_dinov2():
    vits = pytest.importorskip("dinov2.models.vision_transformer")
    for ours, official in (("vit_small", vits.vit_small), ("vit_base", vits.vit_base)):
        ref = official(patch_size=14, img_size=224, init_values=1.0, block_chunks=0)
        mine = build_student(ours)
        assert set(mine.state_dict()) == set(ref.state_dict())
        assert all(mine.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())


def test_registers_are_state_dict_keys_and_excluded_from_outputs():
    model = build_student("vit_tiny", img_size=56, depth=2, num_register_tokens=4)
    assert model.state_dict()["register_tokens"].shape == (1, 4, 192)
    out = model.forward_features(torch.randn(1, 3, 56, 56))
    assert out["patch"].shape == (1, 16, 192)


def test_get_intermediate_layers_api():
    model = build_student("vit_tiny", img_size=56, depth=4).eval()
    x = torch.randn(2, 3, 56, 70)  # non-square: 4 x 5 grid
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
        last = model.forward_features(x)
        raw = model.get_intermediate_layers(x, n=[1], norm=False)
    assert len(outs) == 4
    patch, cls = outs[-1]
    assert patch.shape == (2, 192, 4, 5) and cls.shape == (2, 192)
    # the last normed output is exactly forward_features
    torch.testing.assert_close(cls, last["cls"])
    torch.testing.assert_close(patch.flatten(2).transpose(1, 2), last["patch"])
    assert raw[0].shape == (2, 20, 192)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[7])


def test_input_not_multiple_of_patch_is_a_clear_error():
    model = build_student("vit_tiny", img_size=56, depth=1)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 50, 56))


def test_pos_embed_interpolation_matches_dinov2_formula():
    # dense tasks run at 518: a 16x16 grid (224) goes to 37x37
    pos = torch.randn(1, 16 * 16, 8)
    out = resample_patch_pos_embed(pos, (37, 37))
    assert out.shape == (1, 37 * 37, 8)
    grid = pos.reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, scale_factor=(37.1 / 16, 37.1 / 16), mode="bicubic")
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(1, -1, 8))
    assert resample_patch_pos_embed(pos, (16, 16)) is pos  # same grid: untouched


def test_giant_uses_swiglu_with_official_names():
    model = build_vit("vit_giant2", depth=1, embed_dim=64, num_heads=2)
    keys = set(model.state_dict())
    assert {"blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.weight"} <= keys
    assert model.blocks[0].mlp.w12.out_features == 2 * ((int(256 * 2 / 3) + 7) // 8 * 8)
