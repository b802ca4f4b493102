# Proteus ViT-B/14 + DPT fine-tuning on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images, lr 1e-04.
# Paper: 0.303 RMSE (README; 0.304 in Table 6).
_base_ = [
    './_base_/models/dpt_proteus.py', './_base_/datasets/nyu_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = dict(
    backbone=dict(
        arch='vit_base',
        checkpoint='pretrained/proteus-vit-b14.pth',
        out_indices=[3, 5, 7, 11]),
    decode_head=dict(in_channels=[768] * 4, embed_dims=768, post_process_channels=[96, 192, 384, 768]))
optim_wrapper = dict(optimizer=dict(lr=0.0001))
