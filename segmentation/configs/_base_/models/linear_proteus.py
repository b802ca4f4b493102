# Linear probing on a frozen Proteus ViT (defaults: ViT-S/14 at 518): the 4 tapped layers are resized to
# the 37x37 grid, concatenated (4*D channels) and classified by one 1x1 conv. `with_bn=True` adds
# DINOv2's BatchNorm before the conv (the original Proteus head had none).
custom_imports = dict(imports=['common.mmseg_plugin'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(518, 518),
    test_cfg=dict(size_divisor=14))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='ProteusViT',
        arch='vit_small',
        patch_size=14,
        img_size=518,
        checkpoint=None,
        out_indices=[3, 5, 7, 11],
        final_norm=False,
        frozen=True),
    decode_head=dict(
        type='LinearProbeHead',
        in_channels=[384, 384, 384, 384],
        with_bn=False,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(518, 518), stride=(345, 345)))
# AdamW 8e-4 on the head only (frozen backbone parameters are skipped by the constructor).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=8e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='ViTLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0))
