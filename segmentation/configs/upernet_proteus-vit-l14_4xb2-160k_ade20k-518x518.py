# Proteus ViT-L/14 + UperNet fine-tuning on ADE20K at 518, 160k iterations, 4 GPUs x 2 images.
# Paper: 57.7 (README / Table 5) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/datasets/ade20k_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_160k.py'
]
model = dict(
    backbone=dict(
        arch='vit_large',
        checkpoint='pretrained/proteus-vit-l14.pth',
        out_indices=[7, 11, 15, 23], drop_path_rate=0.2),
    neck=dict(embed_dim=1024),
    decode_head=dict(in_channels=[1024] * 4, channels=1024),
    auxiliary_head=dict(in_channels=1024))
train_dataloader = dict(batch_size=2)
