# DPT depth fine-tuning on a Proteus ViT (defaults: ViT-S/14 at 518). The size-specific keys come
# from _base_/backbones/vit-*.py (its `dpt` overlay).
custom_imports = dict(imports=['common.mmseg_plugin', 'depth.heads'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)  # the Runner reverts SyncBN to BN when not distributed
data_preprocessor = dict(
    type='SegDataPreProcessor',
    # ImageNet normalisation, as in pretraining (the original used 127.5/127.5 here; see depth/README.md)
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=0,  # padded depth = 0 = invalid, ignored by SiLog and the metric
    size=(518, 518),
    test_cfg=dict(size_divisor=14))
model = dict(
    type='ProteusDepthEstimator',  # mmseg's DepthEstimator with the test-mode dispatch fixed
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='ProteusViT',
        arch='vit_small',
        patch_size=14,
        img_size=518,
        checkpoint=None,  # _base_/backbones/vit-*.py point this at a Proteus backbone file
        out_indices=[3, 5, 7, 11],
        final_norm=False,
        output_cls_token=True,  # DPT's 'project' readout uses the CLS token of each level
        drop_path_rate=0.1),
    decode_head=dict(
        type='DepthDPTHead',
        in_channels=[384, 384, 384, 384],
        in_index=[0, 1, 2, 3],
        input_transform='multiple_select',
        channels=256,
        embed_dims=384,
        post_process_channels=[48, 96, 192, 384],
        readout_type='project',
        patch_size=14,
        norm_cfg=norm_cfg,
        min_depth=1e-3,
        max_depth=10.0,
        align_corners=False,
        loss_decode=dict(type='SiLogLoss')),
    train_cfg=dict(),
    # each 518 crop is predicted with its horizontal flip; stride 129 as the original
    test_cfg=dict(mode='slide_flip', crop_size=(518, 518), stride=(129, 129)))
# AdamW; the backbone trains at 0.1x the head lr (lr: S 4e-4, B/L 1e-4, set by the leaves).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01),
    constructor='ViTLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0, backbone_lr_mult=0.1))
