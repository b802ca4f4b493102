# Proteus ViT-Ti/14 frozen + linear depth head (4 layers, BN, 1x1 conv) on NYU-Depth V2 at 518, 25k iterations.
# No paper number (linear column reported for ViT-S only).
_base_ = [
    './_base_/models/linear_depth_proteus.py', './_base_/datasets/nyu_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = dict(
    backbone=dict(
        arch='vit_tiny',
        checkpoint='pretrained/proteus-vit-t14.pth',
        out_indices=[3, 5, 7, 11]),
    decode_head=dict(in_channels=[192] * 4))
optim_wrapper = dict(optimizer=dict(lr=0.0004))
