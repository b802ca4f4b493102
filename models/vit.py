"""The one ViT of the project: DINOv2's architecture and key layout, assembled from timm's layers.

Students (Ti/S/B/L) and the DINOv2 / SynCLR teachers are all this class. Why not timm's
`VisionTransformer` itself: it has no mask token, stores registers as `reg_token` with a different
position-embedding layout, and interpolates position embeddings with antialiasing and no offset, so
its features and state-dict keys differ from the official DINOv2 ones. Composing timm's `PatchEmbed`,
`Block` (fused SDPA attention, LayerScale, drop path) and `Mlp` keeps timm's kernels while giving
exactly the official key set: DINOv2's own tools load our students and we load theirs.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from .pos_embed import INTERPOLATE_OFFSET, resample_patch_pos_embed


class SwiGLUFFN(nn.Module):
    """DINOv2's SwiGLU MLP (ViT-g), with the official `w12` / `w3` key names."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=None, drop=0.0,
                 bias=True, **_):
        super().__init__()
        hidden = hidden_features or in_features
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # DINOv2's "fused" hidden width rounding
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features or in_features, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DinoVisionTransformer(nn.Module):
    """Pre-norm ViT with CLS token, optional registers, mask token and DINOv2 pos-embed interpolation.

    Args:
        img_size: size the position embedding is built for (224 for students, 518 for DINOv2 teachers).
        patch_size, embed_dim, depth, num_heads, mlp_ratio: the usual ViT sizes.
        init_values: LayerScale init (1.0 for Proteus students, None for no LayerScale, e.g. SynCLR).
        num_register_tokens: DINOv2 "registers" inserted after CLS (no position embedding).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        ffn: "mlp" (GELU) or "swiglu" (ViT-g).
        interpolate_offset: DINOv2's +0.1 offset for run-time pos-embed interpolation.
    Capabilities: `embed_dim` (= `patch_dim`), `has_mask_token` (True: masked views use the mask token).
    """

    has_mask_token = True

    def __init__(self, img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                 init_values=1.0, num_register_tokens=0, drop_path_rate=0.0, ffn="mlp",
                 interpolate_offset=INTERPOLATE_OFFSET):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.patch_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        # strict_img_size=False: any multiple of the patch size is accepted (dense tasks run at 518)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # zero init, as DINOv2/iBOT
        mlp_layer = {"mlp": Mlp, "swiglu": SwiGLUFFN}[ffn]
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear; plain floats (meta-device safe)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=init_values,
                  drop_path=dpr[i], norm_layer=norm_layer, mlp_layer=mlp_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.init_weights()

    def init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def interpolate_pos_encoding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + h*w, D) position embedding for a (h, w) patch grid (DINOv2 run-time semantics)."""
        patch_pos = resample_patch_pos_embed(self.pos_embed[:, 1:], grid_hw, self.interpolate_offset)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify, apply the mask token, add positions, insert registers.

        x: (B, 3, H, W); masks: bool (B, N) with N = (H/p)*(W/p), True = replaced by the mask token.
        Returns (B, 1 + R + N, D).
        """
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}; resize or pad the input")
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must be bool (B, N)={tuple(x.shape[:2])}, got {tuple(masks.shape)}")
            # replace *before* adding positions: masked tokens keep their position (iBOT / DINOv2)
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding((H // p, W // p)).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """Returns dict(cls=(B, D), patch=(B, N, D)) after the final LayerNorm (registers excluded)."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"cls": x[:, 0], "patch": x[:, self.num_prefix_tokens:]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]

    def get_intermediate_layers(self, x: torch.Tensor, n=1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """DINOv2's feature API: outputs of the last `n` blocks (or of the block indices in `n`).

        Each output is the patch tokens (B, N, D), or (B, D, h, w) with `reshape`; with
        `return_class_token` each is a pair (patch, cls (B, D)). `norm` applies the final LayerNorm.
        """
        B, _, H, W = x.shape
        depth = len(self.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= depth:
            raise ValueError(f"block indices {sorted(wanted)} out of range for a {depth}-block ViT")
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outputs.append(self.norm(x) if norm else x)
        cls_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, self.num_prefix_tokens:] for out in outputs]
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        return tuple(patches)


# Student sizes: (embed_dim, depth, num_heads). A new size is one row here.
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


def build_vit(name: str, patch_size: int = 14, img_size: int = 224, num_register_tokens: int = 0,
              drop_path_rate: float = 0.0, init_values: float | None = 1.0, **kwargs) -> DinoVisionTransformer:
    """Build a ViT by size name; extra kwargs (e.g. depth / embed_dim for tiny test models) override."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {name!r}; expected one of {sorted(VIT_SIZES)}")
    embed_dim, depth, num_heads = VIT_SIZES[name]
    args = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                ffn="swiglu" if name == "vit_giant2" else "mlp")
    args.update(kwargs)
    return DinoVisionTransformer(img_size=img_size, patch_size=patch_size, init_values=init_values,
                                 num_register_tokens=num_register_tokens, drop_path_rate=drop_path_rate, **args)


STUDENTS = ("vit_tiny", "vit_small", "vit_base", "vit_large")  # the student sizes of VIT_SIZES


def build_student(name: str, patch_size: int = 14, img_size: int = 224, num_register_tokens: int = 0,
                  drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """A randomly initialised Proteus student: DINOv2 ViT with LayerScale 1.0, qkv bias, LN eps 1e-6, or
    `timm:<name>`, any timm architecture (models.timm_student.TimmStudent; patch_size does not apply)."""
    from .timm_student import build_timm_student, is_timm_name

    if is_timm_name(name):
        return build_timm_student(name, img_size=img_size, drop_path_rate=drop_path_rate, **kwargs)
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; expected one of {STUDENTS} or timm:<name>")
    return build_vit(name, patch_size, img_size, num_register_tokens, drop_path_rate, init_values=1.0, **kwargs)


def parse_size_kwargs(text, flag: str = "--student-kwargs", ints_only: bool = True) -> dict:
    """'depth=2,embed_dim=64' or JSON ('{"depth": 2}') -> dict: the size overrides every entry point takes
    (pretraining's --student-kwargs, the evaluations' --model-kwargs, tools.export). A dict passes through.
    `ints_only`: JSON values must be integers too (key=value pairs always are)."""
    import json

    from .errors import ConfigError

    if isinstance(text, dict):
        return dict(text)
    text = (text or "").strip()
    if text.startswith(("{", "[")):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} is not valid JSON ({e}): {text!r}") from e
        if not isinstance(out, dict):
            raise ConfigError(f"{flag} must be a JSON object such as '{{\"depth\": 2}}', got {text!r}")
        if ints_only and not all(isinstance(v, int) and not isinstance(v, bool) for v in out.values()):
            raise ConfigError(f"{flag} values must be integers, got {out}")
        return out
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"{flag} expects key=int pairs such as depth=2,embed_dim=64 (or JSON); got {item!r}")
        out[key.strip()] = int(value)
    return out
