"""Frozen teachers behind one interface, defined by one registry: `TEACHER_FAMILIES`, one row per family.

`build_teacher(name, checkpoint)` returns a `Teacher`: eval mode, no grads, `embed_dim`, `summary_dim`,
`patch_size`, `summary` (what its `cls` target is, in words) and
`forward(x) -> dict(cls=(B, summary_dim), patch=(B, N, embed_dim))`,
where `x` is the ImageNet-normalised batch the student sees. A teacher trained with another
normalisation (CLIP, SigLIP2, PE, AIMv2, C-RADIO) converts the batch itself.

A family row (`TeacherFamily`) holds everything about a kind of teacher: its names and per-name
architecture (patch size, width), the mean/std its publisher trained with, what its summary (`cls`) and
patch targets are, whether its patch tokens are targets at all (not for CLIP), where its file comes
from, its licence, a loader from the publisher's file and a random-weight builder (tests, benchmarks).
Nothing parses a teacher name: a name is looked up in the rows, or is `timm:<any timm model>`.

- DINOv2 / SynCLR: final-LayerNorm CLS and patch tokens (registers excluded).
- CLIP: `cls` = ln_post(CLS) *before* the joint-space projection (the Proteus target). `patch` = ln_post
  applied to the patch tokens (OpenAI applies ln_post to CLS only; the patch tokens get no direct training
  signal, which is why Proteus distils CLIP with the token objective alone).
- DINOv3: CLS after the final norm; patch tokens after it, the 4 registers excluded.
- SigLIP2 / PE-core: the attention-pooling (MAP) head's output, before any projection into the text space;
  patch tokens after the final norm (PE's class token excluded).
- AIMv2: the mean of the final-norm patch tokens (the model's own `avg` head); the patch tokens.
- C-RADIO v3/v4: the summary tokens (one per RADIO teacher, the file's `summary_idxs`) concatenated, or the
  one `summary_index` names; the spatial features (registers excluded). NVIDIA's trust_remote_code file or
  transformers' RadioModel file; normalised with the file's input conditioner.
- timm:<name>: timm's `forward_features` (after its final norm). Summary: the model's attention-pooling
  head if it has one, else its class token, else its own `global_pool` over the tokens; the choice is
  `Teacher.summary`, logged once when the teacher is built.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError, MissingFileError
from .vit import VIT_SIZES, build_vit
from . import teacher_layouts as layouts
from .weights import load_state_dict_checked, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
DINOV2_SIZES = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}


class Teacher(nn.Module):
    """A frozen feature extractor. `backbone.forward_features(x)` must return dict(cls, patch).

    Capabilities are attributes: `embed_dim` (width of the patch targets), `summary_dim` (width of the `cls`
    target: `embed_dim` except for C-RADIO's concatenated summary), `patch_size`, `patch_targets` (whether
    its patch tokens are distillation targets: False for CLIP), `mean` / `std` (the normalisation it was
    trained with), `summary` (what the `cls` target is, in words; recorded in config.json).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, patch_size: int, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, name: str = "", patch_targets: bool = True, summary: str = "class token",
                 summary_dim: int | None = None):
        super().__init__()
        self.backbone, self.embed_dim, self.patch_size, self.name = backbone, embed_dim, patch_size, name
        self.patch_targets, self.mean, self.std = patch_targets, tuple(mean), tuple(std)
        self.summary, self.summary_dim = summary, summary_dim or embed_dim
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
    """Adapts a timm model to the dict(cls, patch) interface.

    `patch`: the tokens after the final norm, prefix tokens (class, registers, summary) excluded.
    `cls` by `pool`: "cls" the first token; "head" the model's own pooling (`forward_head(pre_logits=True)`:
    SigLIP's / PE's attention-pooling head before any projection, AIMv2's mean); "mean" the mean of the
    patch tokens; "tokens" the prefix tokens at `summary_idxs`, concatenated (C-RADIO).
    """

    def __init__(self, model: nn.Module, pool: str = "cls", summary_idxs=()):
        super().__init__()
        self.model, self.pool, self.summary_idxs = model, pool, tuple(summary_idxs)
        self.n_prefix = getattr(model, "num_prefix_tokens", 1)

    def forward_features(self, x):
        tokens = self.model.forward_features(x)  # (B, prefix + N, D)
        patch = tokens[:, self.n_prefix:]
        if self.pool == "cls":
            cls = tokens[:, 0]
        elif self.pool == "head":
            cls = self.model.forward_head(tokens, pre_logits=True)
        elif self.pool == "tokens":
            cls = tokens[:, list(self.summary_idxs)].flatten(1)
        else:
            cls = patch.mean(1)
        return {"cls": cls, "patch": patch}


def timm_summary(model: nn.Module) -> tuple[str, str]:
    """(pool, words) for a timm model: its attention-pooling head, else its class token, else its own pool."""
    if getattr(model, "attn_pool", None) is not None:
        return "head", "the attention-pooling head's output (before any projection)"
    if getattr(model, "cls_token", None) is not None:
        return "cls", "the class token after the final norm"
    gp = getattr(model, "global_pool", "")
    if gp in ("avg", "avgmax", "max", "avg_max"):
        return "head", f"no class token and no pooling head: the model's own global_pool={gp!r} over the patch tokens"
    return "mean", "no class token and no pooling head: the mean of the patch tokens"


# ---- publisher files --------------------------------------------------------------------------------------
def read_teacher_file(path: str, hint: str) -> dict:
    """A publisher's file as a flat state dict, never running code: safetensors, or torch's safe loader."""
    if str(path).endswith(".safetensors") and os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise CheckpointError(f"could not read {path} (truncated or not a safetensors file?): {err}\n{hint}") from err
    return unwrap_state_dict(read_checkpoint(path, hint=hint))


def _needs_file(name: str, source: str) -> ConfigError:
    return ConfigError(f"teacher {name} needs --teacher-checkpoint (no download for it): {source}")


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


# ---- the registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherSpec:
    """What a named teacher is, known before its weights are read (config validation, benchmarks)."""
    patch_size: int
    embed_dim: int
    patch_targets: bool
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    family: str = ""
    arch: str = ""  # the family's architecture id: a timm model name or one of our ViT sizes
    arch_kwargs: dict = field(default_factory=dict)  # overrides of the architecture (tiny test rows)


@dataclass(frozen=True)
class TeacherFamily:
    """One kind of teacher. `names`: teacher name -> (arch, patch size, width[, arch kwargs]).

    `load(spec, name, checkpoint, img_size) -> Teacher` reads the publisher's file (or downloads it, where the
    family can); `random(spec, name, img_size) -> Teacher` builds it with random weights (tests, benchmarks).
    """
    title: str
    names: dict
    summary: str
    patch: str
    source: str
    licence: str
    load: Callable
    random: Callable
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    patch_targets: bool = True
    arch_kwargs: dict = field(default_factory=dict)  # for every name of the family (as its publisher ran it)
    summary_tokens: bool = False  # several summary tokens (C-RADIO): `summary_index` may pick one of them

    def spec(self, key: str, name: str) -> TeacherSpec:
        arch, patch, dim, *kw = self.names[name]
        return TeacherSpec(patch, dim, self.patch_targets, self.mean, self.std, key, arch,
                           {**self.arch_kwargs, **(kw[0] if kw else {})})


def _teacher(family: TeacherFamily, spec: TeacherSpec, backbone: nn.Module, name: str, **kw) -> Teacher:
    return Teacher(backbone, spec.embed_dim, spec.patch_size, spec.mean, spec.std, name=name,
                   patch_targets=spec.patch_targets, **{"summary": family.summary, **kw})


# DINOv2 / SynCLR: our own ViT (models/vit.py)
def _dinov2_model(spec: TeacherSpec):
    # official hub models are built at 518 px (37x37 grid) and interpolate at run time
    return build_vit(spec.arch, patch_size=14, img_size=518, **spec.arch_kwargs)


def _dinov2_load(spec, name, checkpoint, img_size):
    reg = spec.arch_kwargs.get("num_register_tokens", 0)
    arch_id = f"dinov2_vit{ {v: k for k, v in DINOV2_SIZES.items()}[spec.arch] }14"
    url = DINOV2_URL.format(arch=arch_id, reg="_reg4" if reg else "")
    sd = _read_or_download(checkpoint, url, name)
    model = _dinov2_model(spec)
    load_state_dict_checked(model, unwrap_state_dict(sd), what=f"teacher {name}")
    return _teacher(TEACHER_FAMILIES["dinov2"], spec, model, name)


def _synclr_load(spec, name, checkpoint, img_size):
    if not checkpoint:
        raise ConfigError(f"teacher {name} needs --teacher-checkpoint: the SynCLR release checkpoint")
    sd = unwrap_state_dict(read_checkpoint(checkpoint, hint="the SynCLR release checkpoint"))
    if any(k.startswith("visual.") for k in sd):  # released files: module.visual.* (module. already gone)
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    # SynCLR's mask token is (1, 1, D) and its classifier head is unused: neither is part of the teacher
    sd = {k: v for k, v in sd.items() if k != "mask_token" and not k.startswith("head.")}
    model = build_vit(spec.arch, patch_size=spec.patch_size, img_size=224, init_values=None)  # no LayerScale
    load_state_dict_checked(model, sd, allowed_missing=("mask_token",), what=f"teacher {name}")
    return _teacher(TEACHER_FAMILIES["synclr"], spec, model, name)


def _vit_random(spec, name, img_size):
    kw = dict(spec.arch_kwargs)
    if spec.family == "synclr":
        kw["init_values"] = None
    model = build_vit(spec.arch, patch_size=spec.patch_size, img_size=518 if spec.family == "dinov2" else 224, **kw)
    return _teacher(TEACHER_FAMILIES[spec.family], spec, model, name)


# timm-backed families
def _timm_model(spec: TeacherSpec, img_size: int | None = None, **kw):
    import timm

    kw = {"num_classes": 0, **spec.arch_kwargs, **kw}
    if img_size is not None:
        kw["img_size"] = img_size
    if spec.family != "c_radio":  # NaFlexVit takes any size; the others resample / re-grid their positions
        kw.setdefault("dynamic_img_size", True)
    return timm.create_model(spec.arch, pretrained=False, **kw)


def _resize_grid(pos: torch.Tensor, old: tuple, new: tuple, mode: str) -> torch.Tensor:
    """(1, gh*gw, C) position rows on the stored grid -> (1, h*w, C) on `new`; align_corners=False, no antialias."""
    import torch.nn.functional as F

    if tuple(new) == tuple(old):
        return pos
    c = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=tuple(new), mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, c)


def _bicubic_pos_embed(model: nn.Module) -> nn.Module:
    """Resample a prefix-free ViT's position embedding as transformers' SigLIP does at a new grid (bicubic,
    align_corners=False, no antialias; timm's default antialiases, which differs at a new grid)."""
    import types

    def _pos_embed(self, x):  # x (B, H, W, C) with dynamic_img_size
        b, h, w, c = x.shape
        pos = _resize_grid(self.pos_embed, self.patch_embed.grid_size, (h, w), "bicubic")
        return self.pos_drop(x.reshape(b, h * w, c) + pos)

    assert model.num_prefix_tokens == 0 and model.dynamic_img_size
    model._pos_embed = types.MethodType(_pos_embed, model)
    return model


def _meta_pe_positions(model: nn.Module) -> nn.Module:
    """timm's PE (Eva) with Meta's positions (perception_models `pe.py` / `rope.py`) on every grid.

    - RoPE: Meta rotates by the integer patch indices (+1 with a class token) on any grid; timm's PE rescales
      them onto its pretraining grid (`ref_feat_shape`, EVA's scheme), which differs at every other grid
      (a tiny test model: at every size). timm's factory drops a `ref_feat_shape=None` kwarg, so it is unset
      on the built module; its rotation layout (x then y, interleaved pairs) is Meta's.
    - The absolute table: Meta resamples the stored grid rows bilinearly (align_corners=False, no antialias;
      timm: bicubic with antialias), the class token's row as is.
    """
    import types

    def _pos_embed(self, x):  # x (B, H, W, C) with dynamic_img_size; returns (tokens, rope), as Eva's
        b, h, w, c = x.shape
        n_pre = self.num_prefix_tokens
        pos = self.pos_embed
        pos = torch.cat([pos[:, :n_pre], _resize_grid(pos[:, n_pre:], self.patch_embed.grid_size, (h, w),
                                                      "bilinear")], 1)
        x = x.reshape(b, h * w, c)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
        return self.pos_drop(x + pos), self.rope.get_embed(shape=(h, w))

    assert model.dynamic_img_size and model.reg_token is None and not model.no_embed_class
    assert model.patch_drop is None and model.rope is not None and not model.rope_mixed
    assert model.rope.grid_type == "index" and not model.rope.rotate_half
    model.rope.ref_feat_shape = None
    model._pos_embed = types.MethodType(_pos_embed, model)
    return model


def _row_img_size(spec: TeacherSpec) -> int:
    """The input size a family row builds its architecture for (a tiny row's img_size, else timm's default)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.arch)
    return spec.arch_kwargs.get("img_size") or (cfg.input_size[-1] if cfg else 224)


def _stored_img_size(sd: dict, patch: int) -> int | None:
    """The input size a publisher's file was made for: its square position table (a class-token row allowed)
    times the patch size; None when the file has no table (the family's default then)."""
    import math

    for key in ("pos_embed", "visual.trunk.pos_embed", "visual.positional_embedding", "positional_embedding",
                "embeddings.position_embedding.weight", "vision_model.embeddings.position_embedding.weight"):
        if key in sd:
            rows = sd[key].shape[-2]
            for n in (rows, rows - 1):
                if n > 0 and math.isqrt(n) ** 2 == n:
                    return math.isqrt(n) * patch
    return None


def _timm_teacher(spec, name, model, **kw):
    if spec.family == "siglip2":
        model = _bicubic_pos_embed(model)
    elif spec.family == "pe_core":
        model = _meta_pe_positions(model)
    family = TEACHER_FAMILIES[spec.family]
    pool = {"dinov3": "cls", "siglip2": "head", "pe_core": "head", "aimv2": "head", "clip": "cls"}[spec.family]
    return _teacher(family, spec, _TimmTokens(model, pool), name, **kw)


def _timm_random(spec, name, img_size, summary_index=None):
    if spec.family == "c_radio":
        model = _timm_model(spec)
        return _radio_teacher(spec, name, model, tuple(range(model.num_prefix_tokens - model.num_reg_tokens)),
                              summary_index)
    return _timm_teacher(spec, name, _timm_model(spec))


def _clip_load(spec, name, checkpoint, img_size):
    from timm.models.vision_transformer import checkpoint_filter_fn

    source = TEACHER_FAMILIES["clip"].source
    if not checkpoint:
        raise _needs_file(name, source)
    sd = unwrap_state_dict(read_checkpoint(checkpoint, hint=source))
    if "conv1.weight" in sd:  # a bare visual tower (the original Proteus file): restore the prefix
        sd = {f"visual.{k}": v for k, v in sd.items()}
    if "visual.class_embedding" not in sd:
        raise CheckpointError(f"{checkpoint} is not an OpenAI CLIP image tower (no `visual.class_embedding` key)")
    sd = {k: v for k, v in sd.items() if k.startswith("visual.") and k != "visual.proj"}
    model = _timm_model(spec, img_size)
    load_state_dict_checked(model, checkpoint_filter_fn(sd, model), what=f"teacher {name}")
    return _timm_teacher(spec, name, model)


def _dinov3_load(spec, name, checkpoint, img_size):
    import timm
    from timm.models.eva import checkpoint_filter_fn

    family = TEACHER_FAMILIES["dinov3"]
    if not checkpoint:
        raise _needs_file(name, family.source)
    sd = read_teacher_file(checkpoint, hint=family.source)
    if layouts.is_hf_dinov3(sd):
        sd = layouts.hf_dinov3_to_timm(sd)
    elif "storage_tokens" not in sd:  # Meta's .pth (timm's filter below maps it)
        raise CheckpointError(f"{checkpoint} is neither Meta's DINOv3 .pth (no `storage_tokens`) nor a "
                              f"transformers DINOv3ViTModel file (no `embeddings.cls_token`): {family.source}")
    biased = any(k.endswith(("attn.q_bias", "attn.v_bias", "attn.qkv.bias")) and bool(v.any()) for k, v in sd.items())
    # Meta's qkv.bias (k part masked) is in every release, all zero in the distilled ones: those load into
    # timm's bias-free model without the keys; non-zero q/v biases need timm's `_qkvb` variant
    if not biased:
        sd = {k: v for k, v in sd.items() if not k.endswith(("qkv.bias", "qkv.bias_mask", "q_bias", "v_bias"))}
    arch = spec.arch + "_qkvb" if biased and not spec.arch.endswith("_qkvb") else spec.arch
    if not timm.is_model(arch):
        raise CheckpointError(f"{checkpoint}: {name} has q/v biases that timm's {spec.arch} cannot hold")
    model = _timm_model(TeacherSpec(**{**spec.__dict__, "arch": arch}))
    if "storage_tokens" in sd:
        sd = checkpoint_filter_fn(sd, model)
    load_state_dict_checked(model, sd, what=f"teacher {name}")
    return _timm_teacher(spec, name, model)


def _hf_or_timm_load(convert_check, convert, filter_module):
    """A loader for families shipped as transformers `model.safetensors` or as timm / open_clip files."""
    def load(spec, name, checkpoint, img_size):
        import importlib

        family = TEACHER_FAMILIES[spec.family]
        if not checkpoint:
            raise _needs_file(name, family.source)
        sd = read_teacher_file(checkpoint, hint=family.source)
        # the model holds the file's own position table (AIMv2 / SigLIP2 / PE ship one file per resolution)
        # and resamples it per input; a table resampled at load as well would be resampled twice
        img_size = _stored_img_size(sd, spec.patch_size)
        if img_size is not None and img_size != _row_img_size(spec):
            log.info("teacher %s: %s holds a %dx%d position grid: built for %d px", name, checkpoint,
                     img_size // spec.patch_size, img_size // spec.patch_size, img_size)
        model = _timm_model(spec, img_size)
        if convert_check(sd):
            sd = convert(sd)
        else:
            sd = importlib.import_module(filter_module).checkpoint_filter_fn(sd, model)
        # a projection into the text space (open_clip / PE `head`) is not part of the target
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        load_state_dict_checked(model, sd, what=f"teacher {name}")
        return _timm_teacher(spec, name, model)
    return load


def _radio_teacher(spec, name, model, summary_idxs, summary_index=None):
    family = TEACHER_FAMILIES["c_radio"]
    idxs = tuple(summary_idxs)
    if summary_index is not None:
        if not 0 <= summary_index < len(idxs):
            raise ConfigError(f"teacher {name}: summary index {summary_index} out of range; its file has "
                              f"{len(idxs)} summary tokens (summary_idxs {list(idxs)}): 0..{len(idxs) - 1} or all")
        idxs = (idxs[summary_index],)
    words = (f"summary token {idxs[0]}" if len(idxs) == 1
             else f"summary tokens {list(idxs)} concatenated ({len(idxs)} x {spec.embed_dim})")
    return _teacher(family, spec, _TimmTokens(model, "tokens", idxs), name, summary=words,
                    summary_dim=len(idxs) * spec.embed_dim)


def _radio_file_matches(sd: dict, model: nn.Module, path: str) -> list[int]:
    """The file's summary_idxs, after checking its prefix tokens and stored grid against the row's model.

    The row fixes both (timm: one class token + `reg_tokens`, which hold RADIO's other summary tokens and its
    registers; `pos_embed_grid_size`); the file's `cls_token.token` (cls + registers, D) and `pos_embed`
    (1, G*G, D) must agree, and every summary index must name a prefix token."""
    source = TEACHER_FAMILIES["c_radio"].source
    g = "radio_model.model.patch_generator."
    n_prefix, (gh, gw) = sd[g + "cls_token.token"].shape[0], model.embeds.pos_embed.shape[1:3]
    if n_prefix != model.num_prefix_tokens or sd[g + "pos_embed"].shape[1] != gh * gw:
        raise CheckpointError(f"{path}: {n_prefix} summary/register tokens and {sd[g + 'pos_embed'].shape[1]} "
                              f"stored positions, but teacher row expects {model.num_prefix_tokens} and {gh}x{gw}: "
                              f"is it the file of another C-RADIO model? {source}")
    idxs = sd.get("radio_model.summary_idxs")
    if idxs is None or not all(0 <= int(i) < n_prefix for i in idxs.tolist()):
        raise CheckpointError(f"{path} has no valid `summary_idxs` (got {None if idxs is None else idxs.tolist()}): "
                              f"which of its {n_prefix} prefix tokens are summaries is unknown; {source}")
    return [int(i) for i in idxs.tolist()]


def _radio_load(spec, name, checkpoint, img_size, summary_index=None):
    from dataclasses import replace

    from timm.models.naflexvit import checkpoint_filter_fn

    family = TEACHER_FAMILIES["c_radio"]
    if not checkpoint:
        raise _needs_file(name, family.source)
    sd = read_teacher_file(checkpoint, hint=family.source)
    model = _timm_model(spec)
    if layouts.is_hf_radio(sd):  # transformers' RadioModel file -> NVIDIA's layout, read by timm's converter
        sd = layouts.hf_radio_to_nvidia(sd, layer_scale=any(k.endswith(".ls1.gamma") for k in model.state_dict()))
    elif "radio_model.model.patch_generator.embedder.weight" not in sd:
        raise CheckpointError(f"{checkpoint} is neither NVIDIA's C-RADIO model.safetensors (no "
                              f"`radio_model.model.patch_generator.*`) nor a transformers RadioModel file (no "
                              f"`embeddings.cls_register_token`): {family.source}")
    idxs = _radio_file_matches(sd, model, checkpoint)
    new = checkpoint_filter_fn(dict(sd), model)  # NaFlexVit keeps RADIO's stored grid, resampled per input
    load_state_dict_checked(model, new, what=f"teacher {name}")
    # RADIO normalises with its input conditioner's buffers (pixels in [0, 1]): the file's, not the row's
    cond = {k: sd.get(f"radio_model.input_conditioner.norm_{k}") for k in ("mean", "std")}
    spec = replace(spec, **{k: tuple(v.flatten().tolist()) for k, v in cond.items() if v is not None})
    return _radio_teacher(spec, name, model, idxs, summary_index)


# the generic row: any timm model, `timm:<name>`
def _generic_timm_load(spec, name, checkpoint, img_size):
    import timm

    model_name = name[len(TIMM_PREFIX):]
    # our safe reader (clear errors, TorchScript without its code), then timm's own key filter
    overlay = dict(state_dict=read_checkpoint(checkpoint)) if checkpoint else None
    try:
        model = timm.create_model(model_name, pretrained=True, num_classes=0, img_size=img_size,
                                  pretrained_cfg_overlay=overlay, dynamic_img_size=True)
    except OSError as err:  # offline and not in the Hugging Face cache: one line that says where to get it
        if checkpoint:
            raise
        cfg = timm.models.get_pretrained_cfg(model_name)
        where = (cfg.hf_hub_id or cfg.url) if cfg else "the Hugging Face hub"
        raise ConfigError(f"teacher {name}: no --teacher-checkpoint and its pretrained weights could not be "
                          f"downloaded ({type(err).__name__}); get them from {where} (timm) and pass "
                          f"--teacher-checkpoint FILE") from None
    cfg = model.pretrained_cfg
    pool, words = timm_summary(model)
    log.info("teacher %s: summary (cls) target = %s", name, words)
    generic = TeacherSpec(model.patch_embed.patch_size[0], model.embed_dim, True, cfg.get("mean", IMAGENET_MEAN),
                          cfg.get("std", IMAGENET_STD), "timm", model_name)
    return Teacher(_TimmTokens(model, pool), generic.embed_dim, generic.patch_size, generic.mean, generic.std,
                   name=name, summary=words)


def _generic_timm_random(spec, name, img_size):
    import timm

    model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=0, img_size=img_size,
                              dynamic_img_size=True)
    pool, words = timm_summary(model)
    cfg = model.pretrained_cfg
    return Teacher(_TimmTokens(model, pool), model.embed_dim, model.patch_embed.patch_size[0],
                   cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), name=name, summary=words)


TIMM_PREFIX = "timm:"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
HF = "https://huggingface.co/"

TEACHER_FAMILIES: dict[str, TeacherFamily] = {
    "dinov2": TeacherFamily(
        "DINOv2",
        {**{f"dinov2_vit{s}14": (a, 14, VIT_SIZES[a][0]) for s, a in DINOV2_SIZES.items()},
         **{f"dinov2_vit{s}14_reg": (a, 14, VIT_SIZES[a][0], {"num_register_tokens": 4})
            for s, a in DINOV2_SIZES.items()}},
        "the class token after the final LayerNorm", "final-LayerNorm patch tokens (registers excluded)",
        "Meta's dinov2_vit?14[_reg4]_pretrain.pth, downloaded from dl.fbaipublicfiles.com/dinov2 when online",
        "Apache-2.0", _dinov2_load, _vit_random),
    "clip": TeacherFamily(
        "OpenAI CLIP",
        {"clip_vitb16": ("vit_base_patch16_clip_quickgelu_224", 16, 768),
         "clip_vitl14": ("vit_large_patch14_clip_quickgelu_224", 14, 1024)},
        "ln_post(class token), before the projection into the text space",
        "ln_post(patch tokens): no training signal, so no patch objectives",
        "the OpenAI CLIP release (ViT-B-16.pt / ViT-L-14.pt, e.g. via `clip.load`), or a state dict of its "
        "`visual` tower", "MIT", _clip_load, _timm_random, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, patch_targets=False),
    "synclr": TeacherFamily(
        "SynCLR", {"synclr_vitb16": ("vit_base", 16, 768), "synclr_vitl14": ("vit_large", 14, 1024)},
        "the class token after the final LayerNorm", "final-LayerNorm patch tokens",
        "the SynCLR release checkpoint (github.com/google-research/syn-rep-learn)", "Apache-2.0",
        _synclr_load, _vit_random),
    "dinov3": TeacherFamily(
        "DINOv3",
        {"dinov3_vits16": ("vit_small_patch16_dinov3", 16, 384),
         "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3", 16, 384),
         "dinov3_vitb16": ("vit_base_patch16_dinov3", 16, 768),
         "dinov3_vitl16": ("vit_large_patch16_dinov3", 16, 1024),
         "dinov3_vith16plus": ("vit_huge_plus_patch16_dinov3", 16, 1280),
         "dinov3_vit7b16": ("vit_7b_patch16_dinov3", 16, 4096)},
        "the class token after the final LayerNorm", "final-LayerNorm patch tokens, the 4 registers excluded (RoPE)",
        "Meta's dinov3_vit*_pretrain_lvd1689m-*.pth (github.com/facebookresearch/dinov3, request access) or "
        f"{HF}facebook/dinov3-<size>-pretrain-lvd1689m model.safetensors", "DINOv3 License (Meta)",
        _dinov3_load, _timm_random),
    "siglip2": TeacherFamily(
        "SigLIP2",
        {"siglip2_vitb16": ("vit_base_patch16_siglip_224", 16, 768),
         "siglip2_vitb16_256": ("vit_base_patch16_siglip_256", 16, 768),
         "siglip2_vitl16": ("vit_large_patch16_siglip_256", 16, 1024),
         "siglip2_so400m14": ("vit_so400m_patch14_siglip_224", 14, 1152),
         "siglip2_so400m16": ("vit_so400m_patch16_siglip_256", 16, 1152),
         "siglip2_giantopt16": ("vit_giantopt_patch16_siglip_256", 16, 1536)},
        "the attention-pooling (MAP) head's output: the image embedding (no projection follows it)",
        "patch tokens after the final LayerNorm",
        f"{HF}google/siglip2-<size>-patch16-224 model.safetensors (transformers), or the open_clip / timm "
        "file (timm/ViT-B-16-SigLIP2, timm/vit_*_siglip_*.v2_webli)", "Apache-2.0",
        _hf_or_timm_load(layouts.is_hf_siglip, layouts.hf_siglip_to_timm, "timm.models.vision_transformer"),
        # big_vision's GELU is the tanh approximation (as in transformers); timm's SigLIP default is exact
        _timm_random, SIGLIP_MEAN, SIGLIP_STD, arch_kwargs={"act_layer": "gelu_tanh"}),
    "pe_core": TeacherFamily(
        "PE-core",
        {"pe_core_t16": ("vit_pe_core_tiny_patch16_384", 16, 192),
         "pe_core_s16": ("vit_pe_core_small_patch16_384", 16, 384),
         "pe_core_b16": ("vit_pe_core_base_patch16_224", 16, 768),
         "pe_core_l14": ("vit_pe_core_large_patch14_336", 14, 1024),
         "pe_core_g14": ("vit_pe_core_gigantic_patch14_448", 14, 1536)},
        "the attention-pooling head's output, before the projection into the text space",
        "patch tokens after the final LayerNorm (class token excluded)",
        f"{HF}facebook/PE-Core-<size> (Meta's PE-Core-*.pt), or the open_clip / timm file "
        "(timm/PE-Core-*, timm/vit_pe_core_*)", "Apache-2.0",
        _hf_or_timm_load(lambda sd: False, None, "timm.models.eva"), _timm_random, SIGLIP_MEAN, SIGLIP_STD),
    "aimv2": TeacherFamily(
        "AIMv2",
        {"aimv2_large14": ("aimv2_large_patch14_224", 14, 1024),
         "aimv2_huge14": ("aimv2_huge_patch14_224", 14, 1536),
         "aimv2_1b14": ("aimv2_1b_patch14_224", 14, 2048),
         "aimv2_3b14": ("aimv2_3b_patch14_224", 14, 3072),
         "aimv2_large14_336": ("aimv2_large_patch14_336", 14, 1024),
         "aimv2_large14_448": ("aimv2_large_patch14_448", 14, 1024)},
        "the mean of the final-RMSNorm patch tokens (the model's own `avg` head)",
        "patch tokens after the final RMSNorm",
        f"{HF}apple/aimv2-<size>-patch14-224 model.safetensors (transformers), or the timm file",
        "Apple Sample Code License (AIMv2)",
        _hf_or_timm_load(layouts.is_hf_aimv2, layouts.hf_aimv2_to_timm, "timm.models.vision_transformer"),
        _timm_random, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "c_radio": TeacherFamily(
        "C-RADIO",
        {"c_radio_v3_b16": ("naflexvit_base_patch16_radio_v3", 16, 768),
         "c_radio_v3_l16": ("naflexvit_large_patch16_radio_v3", 16, 1024),
         "c_radio_v3_h16": ("naflexvit_huge_patch16_radio_v3", 16, 1280),
         "c_radio_v3_g16": ("naflexvit_giant_patch16_radio_v3", 16, 1536),
         "c_radio_v4_so400m16": ("naflexvit_so400m_patch16_radio_v4", 16, 1152),
         "c_radio_v4_h16": ("naflexvit_huge_patch16_radio_v4", 16, 1280)},
        "RADIO's summary tokens (`summary_idxs` of the file) concatenated, or the one `summary_index` names",
        "the spatial features (tokens after the summary tokens and registers)",
        f"{HF}nvidia/C-RADIOv3-<B|L|H|g> or nvidia/C-RADIOv4-<SO400M|H> model.safetensors",
        "NVIDIA Open Model License", _radio_load, _timm_random, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
        summary_tokens=True),
    "timm": TeacherFamily(
        "any timm model (timm:<name>)", {},
        "its attention-pooling head if it has one, else its class token, else its own global pool (logged, "
        "recorded in config.json)", "the tokens after its final norm, prefix tokens excluded",
        "timm's pretrained weights (Hugging Face hub, cached), or a timm / open_clip file", "per model",
        _generic_timm_load, _generic_timm_random),
}

TEACHERS = [n for f in TEACHER_FAMILIES.values() for n in f.names]  # every built-in name, for help texts


def teacher_family(name: str) -> tuple[str, TeacherFamily]:
    """(key, row) of the family a teacher name belongs to; ConfigError for an unknown name."""
    for key, family in TEACHER_FAMILIES.items():
        if name in family.names:
            return key, family
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return "timm", TEACHER_FAMILIES["timm"]
    raise ConfigError(f"unknown teacher {name!r}; expected one of {TEACHERS} or timm:<model_name>")


def teacher_spec(name: str) -> TeacherSpec | None:
    """The spec of a built-in teacher; None for timm:<name> (known only once built)."""
    key, family = teacher_family(name)
    return family.spec(key, name) if name in family.names else None


def check_summary_index(name: str, summary_index: int | None) -> None:
    """Only a family with several summary tokens (C-RADIO) takes an index; ConfigError for the others."""
    key, family = teacher_family(name)
    if summary_index is not None and not family.summary_tokens:
        raise ConfigError(f"teacher {name} has one summary ({family.summary}); a summary index picks one of "
                          f"several summary tokens (C-RADIO): use all for it")


def build_teacher(name: str, checkpoint: str | None = None, img_size: int = 224, random_weights: bool = False,
                  summary_index: int | None = None) -> Teacher:
    """Build a frozen teacher by name (see TEACHER_FAMILIES, or `timm:<model_name>`).

    `random_weights`: the family's random-weight builder (tests, benchmarks); no file is read.
    `summary_index`: which of the family's summary tokens is the `cls` target (C-RADIO: the position in the
    file's `summary_idxs`); None: the family's default summary (C-RADIO: all of them, concatenated).
    """
    key, family = teacher_family(name)
    check_summary_index(name, summary_index)
    spec = family.spec(key, name) if name in family.names else TeacherSpec(0, 0, True, family="timm")
    if spec.patch_size and img_size % spec.patch_size:  # before any weights load
        raise ConfigError(f"input size {img_size} is not a multiple of teacher {name}'s patch size "
                          f"{spec.patch_size}")
    kw = {} if summary_index is None else {"summary_index": summary_index}  # only summary_tokens families take it
    if random_weights:
        teacher = family.random(spec, name, img_size, **kw)
    else:
        teacher = family.load(spec, name, checkpoint, img_size, **kw)
    if img_size % teacher.patch_size:
        raise ConfigError(f"input size {img_size} is not a multiple of teacher {name}'s patch size "
                          f"{teacher.patch_size}")
    return teacher
