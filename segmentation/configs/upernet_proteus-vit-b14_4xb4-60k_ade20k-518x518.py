# Proteus ViT-B/14 + UperNet fine-tuning on ADE20K at 518, 60k iterations, 4 GPUs x 4 images.
# Paper: 54.4 (README / Table 5) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/datasets/ade20k_518.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = dict(
    backbone=dict(
        arch='vit_base',
        checkpoint='pretrained/proteus-vit-b14.pth',
        out_indices=[3, 5, 7, 11], drop_path_rate=0.1),
    neck=dict(embed_dim=768),
    decode_head=dict(in_channels=[768] * 4, channels=768),
    auxiliary_head=dict(in_channels=768))
train_dataloader = dict(batch_size=4)
