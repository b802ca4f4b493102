# Proteus ViT-L/14 + UperNet fine-tuning on ADE20K at 518, 160k iterations, 4 GPUs x 2 images.
# Paper: 57.7 (README / Table 5) mIoU, single-scale.
_base_ = [
    './_base_/models/upernet_proteus.py', './_base_/backbones/vit-l14.py',
    './_base_/datasets/ade20k_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_160k.py'
]
model = _base_.pop('proteus_vit').upernet  # ViT-L/14 sizes of the upernet keys (backbones/vit-l14.py)
train_dataloader = dict(batch_size=2)
