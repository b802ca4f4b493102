# Proteus ViT-S/14 + UperNet fine-tuning on ADE20K at 518, 60k iterations, 4 GPUs x 8 images.
# Paper: 50.0 (README / Table 2) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/datasets/ade20k_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = dict(
    backbone=dict(
        arch='vit_small',
        checkpoint='pretrained/proteus-vit-s14.pth',
        out_indices=[3, 5, 7, 11], drop_path_rate=0.1),
    neck=dict(embed_dim=384),
    decode_head=dict(in_channels=[384] * 4, channels=384),
    auxiliary_head=dict(in_channels=384))
train_dataloader = dict(batch_size=8)
