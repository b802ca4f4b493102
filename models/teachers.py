"""Frozen teachers: DINOv2 (+ registers), OpenAI CLIP, SynCLR and any timm ViT, behind one interface.

`build_teacher(name, checkpoint)` returns a `Teacher`: eval mode, no grads, `embed_dim`, `patch_size`,
and `forward(x) -> dict(cls=(B, Dt), patch=(B, N, Dt))`, where `x` is the ImageNet-normalised batch the
student sees. A teacher trained with another normalisation (CLIP) converts the batch itself.

What the outputs are, per family:
- DINOv2 / SynCLR: final-LayerNorm CLS and patch tokens (registers excluded).
- CLIP: `cls` = ln_post(CLS) *before* the joint-space projection (the Proteus target). `patch` = ln_post
  applied to the patch tokens (OpenAI applies ln_post to CLS only; the patch tokens get no direct training
  signal, which is why Proteus distils CLIP with the token objective alone).
- timm:<name>: timm's `forward_features` (after its final norm); CLS is the first token, or the mean of
  the patch tokens for models without a class token.
"""
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError, MissingFileError
from .vit import VIT_SIZES, build_vit
from .weights import load_state_dict_checked, read_checkpoint, unwrap_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
DINOV2_SIZES = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
CLIP_TIMM = {"clip_vitb16": "vit_base_patch16_clip_quickgelu_224",
             "clip_vitl14": "vit_large_patch14_clip_quickgelu_224"}
CLIP_SOURCE = "the OpenAI CLIP release ({}.pt, e.g. via `clip.load`), or a state dict of its `visual` tower"
SYNCLR = {"synclr_vitb16": ("vit_base", 16), "synclr_vitl14": ("vit_large", 14)}


class Teacher(nn.Module):
    """A frozen feature extractor. `backbone.forward_features(x)` must return dict(cls, patch).

    Capabilities are attributes: `embed_dim`, `patch_size`, `patch_targets` (whether its patch tokens are
    distillation targets: False for CLIP), `mean` / `std` (the normalisation it was trained with).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, patch_size: int, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, name: str = "", patch_targets: bool = True):
        super().__init__()
        self.backbone, self.embed_dim, self.patch_size, self.name = backbone, embed_dim, patch_size, name
        self.patch_targets, self.mean, self.std = patch_targets, tuple(mean), tuple(std)
        # x_teacher = (x * std_in + mean_in - mean_t) / std_t  ==  x * scale + shift, per channel
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.renormalize = not (torch.allclose(scale, torch.ones(3)) and torch.allclose(shift, torch.zeros(3)))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher never leaves eval mode

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"teacher {self.name}: input {tuple(x.shape[-2:])} is not a multiple of its "
                             f"patch size {self.patch_size}")
        if self.renormalize:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return self.backbone.forward_features(x)


class _TimmTokens(nn.Module):
    """Adapts a timm ViT to the dict(cls, patch) interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward_features(self, x):
        tokens = self.model.forward_features(x)  # (B, prefix + N, D)
        n_prefix = getattr(self.model, "num_prefix_tokens", 1)
        patch = tokens[:, n_prefix:]
        cls = tokens[:, 0] if getattr(self.model, "cls_token", None) is not None else patch.mean(1)
        return {"cls": cls, "patch": patch}


def _dinov2(name: str, checkpoint: str | None) -> Teacher:
    # dinov2_vits14 / dinov2_vitb14_reg ...
    size = name[len("dinov2_vit")]
    reg = name.endswith("_reg")
    arch = name[: len("dinov2_vitX14")]
    url = DINOV2_URL.format(arch=arch, reg="_reg4" if reg else "")
    sd = _read_or_download(checkpoint, url, name)
    # official hub models are built at 518 px (37x37 grid) and interpolate at run time
    model = build_vit(DINOV2_SIZES[size], patch_size=14, img_size=518, num_register_tokens=4 if reg else 0)
    load_state_dict_checked(model, unwrap_state_dict(sd), what=f"teacher {name}")
    return Teacher(model, model.embed_dim, 14, name=name)


def _read_or_download(checkpoint: str | None, url: str, name: str) -> dict:
    """The given file, or the download of `url` into torch.hub's cache, both read by the safe loader.

    The cached file is read like any other checkpoint (weights_only, never TorchScript's code): a file
    someone put into the cache cannot run code. Cache path as torch.hub.load_state_dict_from_url's.
    """
    if checkpoint:
        return read_checkpoint(checkpoint, hint=f"{name}: get it from {url}")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached)
        except Exception as err:  # noqa: BLE001 - offline machines end here
            raise MissingFileError(f"teacher {name}: no --teacher-checkpoint given and the download of {url} "
                                   f"failed ({err}). Download the file and pass its path.") from err
    return read_checkpoint(cached, hint=f"{name}: the cached download of {url}")


def _clip(name: str, checkpoint: str | None, img_size: int) -> Teacher:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not checkpoint:
        raise ConfigError(f"teacher {name} needs --teacher-checkpoint: " + CLIP_SOURCE.format(name[5:]))
    sd = unwrap_state_dict(read_checkpoint(checkpoint, hint=CLIP_SOURCE.format(name[5:])))
    if "conv1.weight" in sd:  # a bare visual tower (the original Proteus file): restore the prefix
        sd = {f"visual.{k}": v for k, v in sd.items()}
    if "visual.class_embedding" not in sd:
        raise CheckpointError(f"{checkpoint} is not an OpenAI CLIP image tower (no `visual.class_embedding` key)")
    sd = {k: v for k, v in sd.items() if k.startswith("visual.") and k != "visual.proj"}
    # dynamic_img_size: other input sizes resample the position embedding at run time
    model = timm.create_model(CLIP_TIMM[name], pretrained=False, num_classes=0, img_size=img_size,
                              dynamic_img_size=True)
    load_state_dict_checked(model, checkpoint_filter_fn(sd, model), what=f"teacher {name}")
    return Teacher(_TimmTokens(model), model.embed_dim, model.patch_embed.patch_size[0],
                   OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, name=name, patch_targets=False)


def _synclr(name: str, checkpoint: str | None) -> Teacher:
    if not checkpoint:
        raise ConfigError(f"teacher {name} needs --teacher-checkpoint: the SynCLR release checkpoint")
    sd = unwrap_state_dict(read_checkpoint(checkpoint, hint="the SynCLR release checkpoint"))
    if any(k.startswith("visual.") for k in sd):  # released files: module.visual.* (module. already gone)
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    # SynCLR's mask token is (1, 1, D) and its classifier head is unused: neither is part of the teacher
    sd = {k: v for k, v in sd.items() if k != "mask_token" and not k.startswith("head.")}
    size, patch = SYNCLR[name]
    model = build_vit(size, patch_size=patch, img_size=224, init_values=None)  # no LayerScale
    load_state_dict_checked(model, sd, allowed_missing=("mask_token",), what=f"teacher {name}")
    return Teacher(model, model.embed_dim, patch, name=name)


def _timm(name: str, checkpoint: str | None, img_size: int) -> Teacher:
    import timm

    model_name = name[len("timm:"):]
    # our safe reader (clear errors, TorchScript without its code), then timm's own key filter
    overlay = dict(state_dict=read_checkpoint(checkpoint)) if checkpoint else None
    model = timm.create_model(model_name, pretrained=True, num_classes=0, img_size=img_size,
                              pretrained_cfg_overlay=overlay, dynamic_img_size=True)
    cfg = model.pretrained_cfg
    return Teacher(_TimmTokens(model), model.embed_dim, model.patch_embed.patch_size[0],
                   cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), name=name)


TEACHERS = ([f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")] + list(CLIP_TIMM) + list(SYNCLR))


@dataclass(frozen=True)
class TeacherSpec:
    """What a built-in teacher is, known before its weights are read (config validation)."""
    patch_size: int
    embed_dim: int
    patch_targets: bool
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def _specs() -> dict:
    specs = {}
    for s in "sblg":
        dim = VIT_SIZES[DINOV2_SIZES[s]][0]
        for r in ("", "_reg"):
            specs[f"dinov2_vit{s}14{r}"] = TeacherSpec(14, dim, True)
    specs["clip_vitb16"] = TeacherSpec(16, 768, False, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    specs["clip_vitl14"] = TeacherSpec(14, 1024, False, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    for name, (size, patch) in SYNCLR.items():
        specs[name] = TeacherSpec(patch, VIT_SIZES[size][0], True)
    return specs


TEACHER_SPECS = _specs()


def teacher_spec(name: str) -> TeacherSpec | None:
    """The spec of a built-in teacher; None for timm:<name> (known only once built)."""
    return TEACHER_SPECS.get(name)


def build_teacher(name: str, checkpoint: str | None = None, img_size: int = 224) -> Teacher:
    """Build a frozen teacher by name (see TEACHERS, or `timm:<model_name>`)."""
    if name.startswith("dinov2_") and name in TEACHERS:
        teacher = _dinov2(name, checkpoint)
    elif name in CLIP_TIMM:
        teacher = _clip(name, checkpoint, img_size)
    elif name in SYNCLR:
        teacher = _synclr(name, checkpoint)
    elif name.startswith("timm:"):
        teacher = _timm(name, checkpoint, img_size)
    else:
        raise ConfigError(f"unknown teacher {name!r}; expected one of {TEACHERS} or timm:<model_name>")
    if img_size % teacher.patch_size:
        raise ConfigError(f"input size {img_size} is not a multiple of teacher {name}'s patch size "
                          f"{teacher.patch_size}")
    return teacher
