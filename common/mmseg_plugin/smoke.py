"""Shrink a shipped dense config into a seconds-long CPU smoke run (used by the tests, handy for debugging).

`shrink_config` keeps everything that defines the recipe (model family, heads, losses, optimizer
constructor, metrics, pipelines) and scales down only sizes: a 4-block ViT of width 64, small crops,
2 iterations, BN instead of SyncBN, no dataloader workers.
"""
from mmengine.config import Config

from models import VIT_SIZES

_CHANNEL_KEYS = ("in_channels", "channels", "embed_dim", "embed_dims", "post_process_channels")
_REF_CROP = 518


def _scale_channels(value, old_dim: int, new_dim: int, untied: int = 32):
    """Scale channel counts tied to the ViT width (D, 4D, D/8 ...); fixed widths (DPT's 256) become `untied`."""
    if isinstance(value, (list, tuple)):
        return type(value)(_scale_channels(v, old_dim, new_dim, untied) for v in value)
    if isinstance(value, int) and (value * new_dim) % old_dim == 0:
        return value * new_dim // old_dim
    return min(value, untied) if isinstance(value, int) else value


def scale_head_channels(model, old_dim: int, new_dim: int) -> None:
    """Neck / decode / auxiliary head channel counts tied to the ViT width, from `old_dim` to `new_dim`."""
    for part in ("neck", "decode_head", "auxiliary_head"):
        if model.get(part):
            for key in _CHANNEL_KEYS:
                if key in model[part]:
                    model[part][key] = _scale_channels(model[part][key], old_dim, new_dim)


def _walk(node, fn):
    """Apply fn to every dict in a nested config structure (dicts and lists)."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def _shrink_pipeline_step(step: dict, crop: int):
    """Short side of (random) resizes -> crop, keeping the long/short ratio (idempotent)."""
    if step.get("type") in ("RandomResize", "Resize") and "scale" in step:
        long_side, short_side = step["scale"]
        step["scale"] = (round(crop * long_side / short_side), crop)
    if step.get("type") == "RandomCrop":
        step["crop_size"] = (crop, crop)


def _shrink_loader(loader: dict, data_root: str | None, batch_size: int, crop: int):
    loader.update(num_workers=0, persistent_workers=False, batch_size=batch_size)
    if data_root is not None:
        loader["dataset"]["data_root"] = data_root
    for step in loader["dataset"]["pipeline"]:
        _shrink_pipeline_step(step, crop)


def shrink_config(cfg: Config, crop: int = 56, dim: int = 64, depth: int = 4, heads: int = 2,
                  data_root: str | None = None, max_iters: int = 2, batch_size: int = 2) -> Config:
    """Return a copy of `cfg` with a tiny backbone, `crop` px crops, `max_iters` iterations, CPU-friendly."""
    cfg = cfg.copy()
    model = cfg.model
    old_dim = VIT_SIZES[model.backbone.arch][0]
    model.backbone.update(img_size=crop, checkpoint=None, out_indices=list(range(depth)),
                          overrides=dict(depth=depth, embed_dim=dim, num_heads=heads))
    scale_head_channels(model, old_dim, dim)
    _walk(cfg._cfg_dict, lambda d: d.update(type="BN") if d.get("type") == "SyncBN" else None)
    model.data_preprocessor.size = (crop, crop)
    stride = model.test_cfg.get("stride")
    if stride:
        model.test_cfg.update(crop_size=(crop, crop), stride=tuple(max(1, round(s * crop / _REF_CROP))
                                                                   for s in stride))
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        _shrink_loader(cfg[name], data_root, batch_size if name == "train_dataloader" else 1, crop)
    cfg.train_cfg.update(max_iters=max_iters, val_interval=max_iters)
    cfg.default_hooks.checkpoint.update(interval=1, max_keep_ckpts=-1)
    cfg.default_hooks.logger.interval = 1
    cfg.env_cfg.cudnn_benchmark = False
    cfg.randomness = dict(seed=0)
    # mmengine shares a visualizer by name across Runners of one process; in-process runs in sequence
    # (tests) each need their own, named after their experiment
    cfg.visualizer.pop("name", None)
    return cfg
