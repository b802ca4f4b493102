# Proteus ViT-B/14 + DPT fine-tuning on NYU-Depth V2 at 518, 25k iterations, 4 GPUs x 4 images, lr 1e-04.
# Paper: 0.303 RMSE (README; 0.304 in Table 6).
_base_ = [
    './_base_/models/dpt_proteus.py', './_base_/backbones/vit-b14.py',
    './_base_/datasets/nyu_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = _base_.pop('proteus_vit').dpt  # ViT-B/14 sizes of the dpt keys (backbones/vit-b14.py)
optim_wrapper = dict(optimizer=dict(lr=0.0001))
