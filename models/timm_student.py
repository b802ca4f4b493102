"""Any timm architecture as a randomly initialised student: `timm:<name>` (convnext_tiny, resnet50,
mobilenetv4_conv_small, vit_small_patch16_224, ...).

`TimmStudent` gives a timm model the student interface the distiller uses:
    forward_features(x, masks=None, grid=(gh, gw)) -> dict(cls=(B, Dc), patch=(B, gh*gw, Dp))
- cls: the model's pooled pre-logits feature (`forward_head(pre_logits=True)`), width `embed_dim`;
- patch: its final feature map (CNNs) or its patch tokens (ViTs), resampled bilinearly onto the target
  grid (the teacher's token grid), width `patch_dim`;
- masks (B, gh*gw) bool: timm models have no mask token, so masking is done in pixel space: every
  pixel of a masked grid cell is set to 0, the dataset mean after ImageNet normalisation.
Capabilities are attributes: `embed_dim`, `patch_dim`, `has_mask_token` (False), `timm_name`.
The wrapped model is `self.model`; its state dict (no classifier: num_classes=0) is what an export holds,
so `timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...))` loads it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def timm_model_keys(state_dict: dict) -> dict:
    """A TimmStudent's state dict (keys `model.<timm key>`) as the timm model's own; any other dict unchanged."""
    if state_dict and all(k.startswith("model.") for k in state_dict):
        return {k[len("model."):]: v for k, v in state_dict.items()}
    return state_dict


def resample_grid(tokens: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) tokens on an h x w grid -> (B, H*W, D) on H x W: bilinear, align_corners=False (cell
    centres), no antialiasing. The identity when the grids are equal (no arithmetic at all)."""
    if tuple(src_hw) == tuple(dst_hw):
        return tokens
    B, N, D = tokens.shape
    grid = tokens.transpose(1, 2).reshape(B, D, *src_hw)
    out = F.interpolate(grid.float(), size=tuple(dst_hw), mode="bilinear", align_corners=False)
    return out.to(tokens.dtype).flatten(2).transpose(1, 2)


def pixel_mask(x: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Zero the pixels of masked grid cells. x (B, 3, H, W), masks (B, gh*gw) bool; H, W multiples of the grid."""
    B, _, H, W = x.shape
    cells = masks.view(B, 1, *grid).to(x.dtype)
    keep = 1.0 - F.interpolate(cells, size=(H, W), mode="nearest")  # (B, 1, H, W)
    return x * keep


class TimmStudent(nn.Module):
    """A randomly initialised timm model behind the student interface (see the module docstring)."""

    has_mask_token = False

    def __init__(self, timm_name: str, img_size: int = 224, drop_path_rate: float = 0.0, **kwargs):
        super().__init__()
        import timm

        if not timm.is_model(timm_name):
            raise ValueError(f"timm has no model {timm_name!r} (see timm.list_models())")
        self.timm_name = timm_name
        self.model = _create(timm_name, img_size, drop_path_rate, **kwargs)
        self.embed_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.patch_dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)

    def feature_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(final features as timm returns them, tokens (B, h*w, Dp), (h, w))."""
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # CNN: (B, C, h, w)
            h, w = feats.shape[-2:]
            return feats, feats.flatten(2).transpose(1, 2), (h, w)
        patch = feats[:, self.num_prefix_tokens:]  # ViT-like: (B, prefix + h*w, D)
        return feats, patch, self.token_grid(x, patch.shape[1])

    def token_grid(self, x: torch.Tensor, n: int) -> tuple[int, int]:
        """(h, w) of a ViT's n patch tokens, in integer arithmetic on sizes (so that tracing, e.g. an ONNX export,
        follows it): the input size over the patch embedding's patch size, else the integer square root."""
        ps = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if ps is not None:
            ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
            h, w = x.shape[-2] // ph, x.shape[-1] // pw
        else:
            h = w = math.isqrt(int(n))
        if not torch.jit.is_tracing() and h * w != n:
            raise ValueError(f"{self.timm_name}: {n} patch tokens do not form a {h}x{w} grid")
        return h, w

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         grid: tuple[int, int] | None = None) -> dict:
        if masks is not None:
            x = pixel_mask(x, masks, grid)
        feats, patch, hw = self.feature_map(x)
        cls = self.model.forward_head(feats, pre_logits=True)  # (B, Dc)
        return {"cls": cls, "patch": resample_grid(patch, hw, grid) if grid is not None else patch}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]

    def get_intermediate_layers(self, x: torch.Tensor, n=1, reshape: bool = False, return_class_token: bool = False,
                                norm: bool = True):
        """DINOv2's evaluation API on the final features: n must be 1 (timm stages differ in width).

        Returns ((patch (B, h*w, Dp), cls (B, Dc)),) like DinoVisionTransformer (patch as (B, Dp, h, w)
        with reshape=True).
        """
        if (n if isinstance(n, int) else len(n)) != 1:
            raise ValueError(f"{self.timm_name}: only the final features are available (n=1), got n={n}")
        feats, patch, (h, w) = self.feature_map(x)
        cls = self.model.forward_head(feats, pre_logits=True)
        if reshape:
            patch = patch.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return ((patch, cls),) if return_class_token else (patch,)


def _create(name: str, img_size: int, drop_path_rate: float, **kwargs) -> nn.Module:
    import timm

    base = dict(pretrained=False, num_classes=0, **kwargs)
    if drop_path_rate:
        base["drop_path_rate"] = drop_path_rate
    try:  # ViT-like models take the input size; CNNs reject the keyword
        return timm.create_model(name, img_size=img_size, **base)
    except TypeError:
        return timm.create_model(name, **base)


def build_timm_student(name: str, img_size: int = 224, drop_path_rate: float = 0.0, **kwargs) -> TimmStudent:
    """`timm:<name>` or `<name>` -> a randomly initialised TimmStudent."""
    return TimmStudent(name[len(PREFIX):] if is_timm_name(name) else name, img_size, drop_path_rate, **kwargs)
