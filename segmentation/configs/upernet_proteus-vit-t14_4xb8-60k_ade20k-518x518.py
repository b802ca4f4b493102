# Proteus ViT-Ti/14 + UperNet fine-tuning on ADE20K at 518, 60k iterations, 4 GPUs x 8 images.
# Paper: 40.7 (README / Table 7) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/backbones/vit-t14.py',
    './_base_/datasets/ade20k_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = _base_.pop('proteus_vit').upernet  # ViT-Ti/14 sizes of the upernet keys (backbones/vit-t14.py)
train_dataloader = dict(batch_size=8)
