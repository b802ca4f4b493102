# Proteus ViT-S/14, frozen, linear head on 4 layers, ADE20K at 518, 60k iterations, 4 GPUs x 8 images.
# Paper: 41.8 (Table 2, "Linear") mIoU.
_base_ = [
    './_base_/models/linear_proteus.py', './_base_/datasets/ade20k_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = dict(
    backbone=dict(
        arch='vit_small',
        checkpoint='pretrained/proteus-vit-s14.pth',
        out_indices=[3, 5, 7, 11]),
    decode_head=dict(in_channels=[384] * 4))
train_dataloader = dict(batch_size=8)
