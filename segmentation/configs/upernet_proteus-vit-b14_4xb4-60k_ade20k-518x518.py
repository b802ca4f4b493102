# Proteus ViT-B/14 + UperNet fine-tuning on ADE20K at 518, 60k iterations, 4 GPUs x 4 images.
# Paper: 54.4 (README / Table 5) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/backbones/vit-b14.py',
    './_base_/datasets/ade20k_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = _base_.pop('proteus_vit').upernet  # ViT-B/14 sizes of the upernet keys (backbones/vit-b14.py)
train_dataloader = dict(batch_size=4)
