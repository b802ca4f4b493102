# Proteus ViT-B/14 frozen + DPT head on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images.
# No paper number (the paper reports the NYU linear column for ViT-S only).
_base_ = [
    './_base_/models/dpt_proteus.py', './_base_/datasets/nyu_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = dict(
    backbone=dict(
        arch='vit_base',
        checkpoint='pretrained/proteus-vit-b14.pth',
        out_indices=[3, 5, 7, 11], frozen=True, drop_path_rate=0.0),
    decode_head=dict(in_channels=[768] * 4, embed_dims=768, post_process_channels=[96, 192, 384, 768]))
optim_wrapper = dict(optimizer=dict(lr=0.0001))
