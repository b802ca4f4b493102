"""Reading checkpoints and loading state dicts with errors that say what is wrong.

Every load in the project goes through `load_state_dict_checked`: strict, or with an explicit set of
keys that may be missing. Never a silent `strict=False`.
"""
import logging
import os
import zipfile

import torch
import torch.nn as nn

from .pos_embed import resample_pos_embed


def read_checkpoint(path: str, hint: str = "") -> dict:
    """torch.load a checkpoint file, or an OpenAI TorchScript archive, with a clear error on failure."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}" + (f"\n{hint}" if hint else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as plain_error:  # noqa: BLE001 - try the TorchScript form before giving up
        if _is_torchscript(path):
            return torch.jit.load(path, map_location="cpu").state_dict()
        raise ValueError(f"could not read checkpoint {path} (truncated, corrupted or not a PyTorch file?): "
                         f"{type(plain_error).__name__}: {plain_error}") from plain_error


def _is_torchscript(path: str) -> bool:
    """OpenAI's CLIP `.pt` files are TorchScript zip archives (they hold a `constants.pkl`)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("constants.pkl") for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def unwrap_state_dict(ckpt: dict, prefix: str = "") -> dict:
    """Descend into `state_dict` / `model` wrappers, keep keys under `prefix` (stripped), drop `module.`."""
    sd = ckpt
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_state_dict_checked(module: nn.Module, state_dict: dict, allowed_missing=(), what: str = "model"):
    """Load strictly, except for the keys in `allowed_missing`; raise one error listing every problem."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(allowed_missing))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state_dict)) if state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        lines.append("  Check the architecture / patch size flags against the checkpoint.")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state_dict, strict=False)
    return sorted(set(own) - set(state_dict))  # the allowed keys that were actually missing


def fit_pos_embed(state_dict: dict, model: nn.Module) -> dict:
    """Resample a checkpoint's `pos_embed` to the model's grid (e.g. official 518-px DINOv2 -> 224)."""
    pos = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state_dict
    grid = model.patch_embed.grid_size
    return {**state_dict, "pos_embed": resample_pos_embed(pos, tuple(grid), num_prefix_tokens=1)}


def backbone_state_dict(ckpt: dict, ema: bool = False) -> dict:
    """Extract a DINOv2-format backbone state dict from any checkpoint we accept.

    - our pretrain `checkpoint.pth`: keys `student` / `student_ema` (DINOv2 format already);
    - our exports `student_backbone[_ema].pth` and official DINOv2 `dinov2_vit?14_pretrain.pth`: flat;
    - original Proteus release / training checkpoints: `model` dict with `student.backbone.*` keys.
    """
    if ema:
        if "student_ema" not in ckpt:
            raise ValueError("ema=True but the checkpoint holds no `student_ema` (pass the full checkpoint.pth "
                             "or the exported student_backbone_ema.pth)")
        return ckpt["student_ema"]
    if "student" in ckpt and isinstance(ckpt["student"], dict):
        return ckpt["student"]
    sd = unwrap_state_dict(ckpt)
    if any(k.startswith("student.backbone.") for k in sd):
        return {k[len("student.backbone."):]: v for k, v in sd.items() if k.startswith("student.backbone.")}
    return sd


# Keys a backbone checkpoint may lack: exports made with timm drop the (unused at eval) mask token.
EVAL_ALLOWED_MISSING = ("mask_token",)


def load_backbone(path: str | None, arch: str, patch_size: int = 14, img_size: int = 224, ema: bool = False,
                  **overrides):
    """The one loader for evaluation: build `arch` and load any accepted checkpoint strictly.

    `path` None or "none" gives the random-init baseline. The position embedding is resampled to the
    model's grid (official DINOv2 files are 518 px). Registers are taken from the checkpoint.
    `overrides` (e.g. depth=2, embed_dim=64, num_heads=2) change the size, for tiny test models.
    Returns the model in eval mode.
    """
    from .vit import build_vit  # local: vit imports this module's siblings only

    if path in (None, "", "none"):
        model = build_vit(arch, patch_size=patch_size, img_size=img_size, **overrides)
        return model.eval()
    sd = backbone_state_dict(read_checkpoint(path), ema=ema)
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    model = build_vit(arch, patch_size=patch_size, img_size=img_size, num_register_tokens=regs, **overrides)
    absent = load_state_dict_checked(model, fit_pos_embed(sd, model), allowed_missing=EVAL_ALLOWED_MISSING,
                                     what=f"{arch} (patch {patch_size}) from {path}")
    if absent:  # allowed, but say so: e.g. timm exports carry no mask token (unused at evaluation)
        logging.getLogger(__name__).info("%s: keys not in the checkpoint, left at init: %s", path, absent)
    return model.eval()
