# Proteus ViT-L/14, frozen, linear head on 4 layers, ADE20K at 518, 60k iterations, 4 GPUs x 8 images.
# No paper number (the paper reports the ADE linear probe for ViT-S only).
_base_ = [
    './_base_/models/linear_proteus.py', './_base_/backbones/vit-l14.py',
    './_base_/datasets/ade20k_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_60k.py'
]
model = _base_.pop('proteus_vit').linear  # ViT-L/14 sizes of the linear keys (backbones/vit-l14.py)
train_dataloader = dict(batch_size=8)
