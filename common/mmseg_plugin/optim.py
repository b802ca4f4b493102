"""Layer-wise lr decay for `ProteusViT`, keyed on our (DINOv2) parameter names.

mmseg's `LayerDecayOptimizerConstructor` only recognises its own BEiT/MAE/ConvNeXt classes and names
(`backbone.layers.i`), so it cannot see our `backbone.vit.blocks.i`. This constructor implements the
BEiT rule that the original Proteus runs used, plus a backbone-wide lr multiplier for the depth recipe:

    layer_id = 0 for the embeddings (cls/pos/register/mask tokens, patch_embed),
               i + 1 for backbone.vit.blocks.i, depth + 1 for everything else (final norm, neck, heads)
    lr       = base_lr * layer_decay_rate ** (depth + 1 - layer_id) * (backbone_lr_mult if in backbone)
    wd       = 0 for 1-D parameters, biases and the token parameters, base wd otherwise

(The original also decayed pos_embed / cls_token because its name test missed the `backbone.` prefix;
we exclude them, as BEiT intended.)
"""
import re

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

from common.optim import TOKEN_PARAM_PATTERNS

# the token parameters (one list for the whole project: common.optim decides what counts as a token)
_EMBED_NAMES = tuple(p.lstrip("*") for p in TOKEN_PARAM_PATTERNS)
_BLOCK_RE = re.compile(r"^backbone\.vit\.blocks\.(\d+)\.")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter of a model whose backbone is ProteusViT (names as in model.named_parameters)."""
    match = _BLOCK_RE.match(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith("backbone.vit.") and (name.split(".")[2] in _EMBED_NAMES or ".patch_embed." in name):
        return 0
    return depth + 1


def no_weight_decay(name: str, param) -> bool:
    return param.ndim == 1 or name.endswith(".bias") or name.split(".")[-1] in _EMBED_NAMES


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """paramwise_cfg keys: `layer_decay_rate` (1.0 = no decay), `backbone_lr_mult` (default 1.0)."""

    def add_params(self, params, module, prefix="", is_dcn_module=None):
        backbone = getattr(module, "backbone", None)
        if backbone is None or not hasattr(backbone, "vit"):
            raise TypeError(f"ViTLayerDecayOptimWrapperConstructor expects a segmentor whose backbone is "
                            f"ProteusViT, got {type(backbone).__name__}; use the default constructor instead")
        unknown = set(self.paramwise_cfg) - {"layer_decay_rate", "backbone_lr_mult"}
        if unknown:
            raise ValueError(f"unknown paramwise_cfg keys {sorted(unknown)}; expected layer_decay_rate and/or "
                             f"backbone_lr_mult")
        rate = float(self.paramwise_cfg.get("layer_decay_rate", 1.0))
        backbone_mult = float(self.paramwise_cfg.get("backbone_lr_mult", 1.0))
        depth = len(backbone.vit.blocks)
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue  # frozen backbone (probing) and parameters outside the graph
            layer_id = vit_layer_id(name, depth)
            decay = not no_weight_decay(name, param)
            scale = rate ** (depth + 1 - layer_id) * (backbone_mult if name.startswith("backbone.") else 1.0)
            key = (layer_id, decay, scale)
            if key not in groups:
                groups[key] = dict(params=[], lr=self.base_lr * scale, lr_scale=scale)
                if not decay or self.base_wd is not None:  # None: keep the optimizer's default decay
                    groups[key]["weight_decay"] = self.base_wd if decay else 0.0
            groups[key]["params"].append(param)
        params.extend(groups[k] for k in sorted(groups))
        summary = ", ".join(f"L{k[0]}{'' if k[1] else '/nowd'} x{k[2]:.3g} ({len(g['params'])})"
                            for k, g in sorted(groups.items()))
        print_log(f"layer-decay param groups (rate {rate}, backbone x{backbone_mult}): {summary}", logger="current")
