# UperNet fine-tuning on a Proteus ViT (defaults: ViT-S/14 at 518). The size-specific keys come from
# _base_/backbones/vit-*.py (its `upernet` overlay).
custom_imports = dict(imports=['common.mmseg_plugin'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)  # the Runner reverts SyncBN to BN when not distributed
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet, as in pretraining
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(518, 518),
    test_cfg=dict(size_divisor=14))  # whole-image / small-image inference needs multiples of the patch
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='ProteusViT',
        arch='vit_small',
        patch_size=14,
        img_size=518,
        checkpoint=None,  # _base_/backbones/vit-*.py point this at a Proteus backbone file
        out_indices=[3, 5, 7, 11],
        final_norm=False,  # as the original (its MAE backbone dropped the final LayerNorm)
        drop_path_rate=0.1),
    neck=dict(type='Feature2Pyramid', embed_dim=384, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=[384, 384, 384, 384],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=384,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(518, 518), stride=(345, 345)))
# AdamW 1e-4 with layer-wise lr decay 0.65 over the ViT blocks (heads at 1.0).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='ViTLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.65))
