# Proteus ViT-S/14 + DPT fine-tuning on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images, lr 4e-04.
# Paper: 0.350 RMSE (README / Table 3).
_base_ = [
    './_base_/models/dpt_proteus.py', './_base_/backbones/vit-s14.py',
    './_base_/datasets/nyu_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = _base_.pop('proteus_vit').dpt  # ViT-S/14 sizes of the dpt keys (backbones/vit-s14.py)
optim_wrapper = dict(optimizer=dict(lr=0.0004))
