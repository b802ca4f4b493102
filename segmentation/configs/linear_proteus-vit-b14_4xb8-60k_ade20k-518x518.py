# Proteus ViT-B/14, frozen, linear head on 4 layers, ADE20K at 518, 60k iterations, 4 GPUs x 8 images.
# No paper number (the paper reports the ADE linear probe for ViT-S only).
_base_ = [
    './_base_/models/linear_proteus.py', './_base_/datasets/ade20k_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = dict(
    backbone=dict(
        arch='vit_base',
        checkpoint='pretrained/proteus-vit-b14.pth',
        out_indices=[3, 5, 7, 11]),
    decode_head=dict(in_channels=[768] * 4))
train_dataloader = dict(batch_size=8)
