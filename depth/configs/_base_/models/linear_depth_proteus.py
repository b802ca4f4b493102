# Linear depth probe on a frozen Proteus ViT (defaults: ViT-S/14 at 518): 4 tapped layers resized and
# concatenated, BatchNorm, one 1x1 conv, output bounded to (1 mm, 10 m) by a scaled sigmoid.
_base_ = ['./dpt_proteus.py']
model = dict(
    backbone=dict(frozen=True, drop_path_rate=0.0, output_cls_token=False),
    decode_head=dict(
        _delete_=True,
        type='LinearDepthHead',
        in_channels=[384, 384, 384, 384],
        with_bn=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        min_depth=1e-3,
        max_depth=10.0,
        align_corners=False,
        loss_decode=dict(type='SiLogLoss')))
