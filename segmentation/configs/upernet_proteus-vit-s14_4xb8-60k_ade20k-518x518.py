# Proteus ViT-S/14 + UperNet fine-tuning on ADE20K at 518, 60k iterations, 4 GPUs x 8 images.
# Paper: 50.0 (README / Table 2) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/backbones/vit-s14.py',
    './_base_/datasets/ade20k_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = _base_.pop('proteus_vit').upernet  # ViT-S/14 sizes of the upernet keys (backbones/vit-s14.py)
train_dataloader = dict(batch_size=8)
