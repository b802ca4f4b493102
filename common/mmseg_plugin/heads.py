"""`LinearProbeHead`: the linear dense probe (DINOv2 / Proteus "linear" protocol) as an mmseg decode head."""
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS


@MODELS.register_module()
class LinearProbeHead(BaseDecodeHead):
    """Resize the selected layers to the first one's grid, concatenate, optional BN, one 1x1 conv.

    Equivalent to mmseg's `FCNHead(num_convs=0)` over `resize_concat` (what the original Proteus config
    used) when `with_bn=False`; `with_bn=True` adds DINOv2's BatchNorm on the concatenated features
    (type from `norm_cfg`, SyncBN by default; the Runner turns SyncBN into BN when not distributed).
    `channels` is derived (sum of in_channels), so configs only list in_channels.
    """

    def __init__(self, in_channels, with_bn=False, norm_cfg=dict(type="SyncBN"), **kwargs):
        kwargs.setdefault("dropout_ratio", 0.0)  # a linear probe: no dropout unless asked for
        kwargs.setdefault("input_transform", "resize_concat")
        kwargs.setdefault("in_index", list(range(len(in_channels))))
        if kwargs["input_transform"] != "resize_concat":
            raise ValueError("LinearProbeHead concatenates its inputs: input_transform must be 'resize_concat'")
        total = sum(in_channels)
        if kwargs.setdefault("channels", total) != total:
            raise ValueError(f"LinearProbeHead channels must equal sum(in_channels)={total}, got "
                             f"{kwargs['channels']}; drop `channels` from the config")
        super().__init__(in_channels=in_channels, norm_cfg=norm_cfg, **kwargs)
        self.bn = build_norm_layer(norm_cfg, total)[1] if with_bn else nn.Identity()

    def forward(self, inputs):
        x = self._transform_inputs(inputs)  # (B, sum(D_i), h, w)
        return self.cls_seg(self.bn(x))
