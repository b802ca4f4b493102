# Proteus ViT-L/14 + DPT fine-tuning on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images, lr 1e-04.
# Paper: 0.240 RMSE (README / Table 6).
_base_ = [
    './_base_/models/dpt_proteus.py', './_base_/datasets/nyu_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = dict(
    backbone=dict(
        arch='vit_large',
        checkpoint='pretrained/proteus-vit-l14.pth',
        out_indices=[7, 11, 15, 23]),
    decode_head=dict(in_channels=[1024] * 4, embed_dims=1024, post_process_channels=[128, 256, 512, 1024]))
optim_wrapper = dict(optimizer=dict(lr=0.0001))
