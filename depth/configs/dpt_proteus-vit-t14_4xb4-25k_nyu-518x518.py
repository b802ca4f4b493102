# Proteus ViT-Ti/14 + DPT fine-tuning on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images, lr 4e-4 (as ViT-S; the
# original has no Ti config).
# Paper: 0.423 RMSE (README / Table 7).
_base_ = [
    './_base_/models/dpt_proteus.py', './_base_/datasets/nyu_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = dict(
    backbone=dict(
        arch='vit_tiny',
        checkpoint='pretrained/proteus-vit-t14.pth',
        out_indices=[3, 5, 7, 11]),
    decode_head=dict(in_channels=[192] * 4, embed_dims=192, post_process_channels=[24, 48, 96, 192]))
optim_wrapper = dict(optimizer=dict(lr=0.0004))
