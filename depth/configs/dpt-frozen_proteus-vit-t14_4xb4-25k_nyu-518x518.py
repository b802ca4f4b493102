# Proteus ViT-Ti/14 frozen + DPT head on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images.
# No paper number (the paper reports the NYU linear column for ViT-S only).
_base_ = [
    './_base_/models/dpt_frozen_proteus.py', './_base_/backbones/vit-t14.py',
    './_base_/datasets/nyu_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = _base_.pop('proteus_vit').dpt  # ViT-Ti/14 sizes of the dpt keys (backbones/vit-t14.py)
optim_wrapper = dict(optimizer=dict(lr=0.0004))
