"""Depth components mmseg 1.2.2 lacks, registered into its MODELS registry.

- `DepthDPTHead`: mmseg's DPTHead is segmentation-only (cls_seg + CE on gt_sem_seg); this one predicts a
  single bounded depth channel and trains with SiLog on `gt_depth_map`.
- `LinearDepthHead`: the "linear" depth probe: 4 layers resized + concatenated, BN, one 1x1 conv, bounded.
- `ProteusDepthEstimator`: mmseg's DepthEstimator with its test-mode dispatch fixed: upstream runs
  `if slide ... if slide_flip ... else whole`, so with `mode='slide'` the sliding-window result is computed
  and then overwritten by whole-image inference. Every other behaviour is inherited.
"""
import torch
from mmseg.models.decode_heads import DPTHead
from mmseg.models.segmentors import DepthEstimator
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from common.mmseg_plugin import LinearProbeHead

_SILOG = dict(type="SiLogLoss")


class BoundedDepthMixin:
    """Turns a head's 1-channel logits into depth in (min_depth, max_depth) and trains it on gt_depth_map.

    The sigmoid bound keeps the prediction positive (SiLog takes its log) and inside the evaluated range;
    the loss is computed on the prediction bilinearly resized to the ground-truth size.
    """

    def _init_depth_range(self, min_depth: float, max_depth: float):
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)

    def to_depth(self, logits: torch.Tensor) -> torch.Tensor:
        return self.min_depth + (self.max_depth - self.min_depth) * torch.sigmoid(logits)

    def _stack_batch_gt(self, batch_data_samples) -> torch.Tensor:
        return torch.stack([s.gt_depth_map.data for s in batch_data_samples], dim=0)  # (B, 1, H, W)

    def loss_by_feat(self, pred_depth: torch.Tensor, batch_data_samples) -> dict:
        gt = self._stack_batch_gt(batch_data_samples)
        pred = resize(pred_depth, size=gt.shape[2:], mode="bilinear", align_corners=self.align_corners)
        losses = {}
        for loss_fn in (self.loss_decode if isinstance(self.loss_decode, torch.nn.ModuleList)
                        else [self.loss_decode]):
            losses[loss_fn.loss_name] = losses.get(loss_fn.loss_name, 0) + loss_fn(pred, gt)
        return losses


def _depth_head_defaults(kwargs: dict) -> dict:
    """One output channel; `threshold` is meaningless for depth but silences mmseg's binary-seg warning."""
    kwargs.setdefault("num_classes", 1)
    kwargs.setdefault("loss_decode", _SILOG)
    kwargs.setdefault("threshold", 0.0)
    if kwargs["num_classes"] != 1:
        raise ValueError(f"depth heads predict one channel; got num_classes={kwargs['num_classes']}")
    return kwargs


@MODELS.register_module()
class DepthDPTHead(BoundedDepthMixin, DPTHead):
    """DPT decoder (mmseg's DPTHead) with one bounded depth output and SiLog loss.

    Args:
        min_depth, max_depth: output range in metres (NYU: 1e-3 .. 10).
        Everything else as DPTHead (embed_dims, post_process_channels, readout_type, ...); the backbone
        must return [map, cls] pairs (ProteusViT(output_cls_token=True)).
    """

    def __init__(self, min_depth=1e-3, max_depth=10.0, **kwargs):
        super().__init__(**_depth_head_defaults(kwargs))
        self._init_depth_range(min_depth, max_depth)

    def forward(self, inputs):
        return self.to_depth(super().forward(inputs))  # (B, 1, H', W') metres


@MODELS.register_module()
class LinearDepthHead(BoundedDepthMixin, LinearProbeHead):
    """Linear depth probe: resize+concat of the tapped layers, BN, one 1x1 conv, bounded output."""

    def __init__(self, in_channels, min_depth=1e-3, max_depth=10.0, with_bn=True, **kwargs):
        super().__init__(in_channels=in_channels, with_bn=with_bn, **_depth_head_defaults(kwargs))
        self._init_depth_range(min_depth, max_depth)

    def forward(self, inputs):
        return self.to_depth(super().forward(inputs))


@MODELS.register_module()
class ProteusDepthEstimator(DepthEstimator):
    """DepthEstimator whose `test_cfg.mode` really selects 'whole', 'slide' or 'slide_flip'."""

    _MODES = ("whole", "slide", "slide_flip")

    def inference(self, inputs, batch_img_metas):
        mode = self.test_cfg.get("mode", "whole")
        if mode not in self._MODES:
            raise ValueError(f"test_cfg.mode must be one of {self._MODES}, got {mode!r}")
        if mode == "slide":
            return self.slide_inference(inputs, batch_img_metas)
        if mode == "slide_flip":
            return self.slide_flip_inference(inputs, batch_img_metas)
        return self.whole_inference(inputs, batch_img_metas)
