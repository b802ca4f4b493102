# Proteus ViT-L/14 frozen + linear depth head (4 layers, BN, 1x1 conv) on NYU-Depth V2 at 518, 25k iterations.
# No paper number (linear column reported for ViT-S only).
_base_ = [
    './_base_/models/linear_depth_proteus.py', './_base_/backbones/vit-l14.py',
    './_base_/datasets/nyu_518.py', 'mmseg::_base_/default_runtime.py', './_base_/schedules/schedule_25k.py'
]
model = _base_.pop('proteus_vit').linear  # ViT-L/14 sizes of the linear keys (backbones/vit-l14.py)
optim_wrapper = dict(optimizer=dict(lr=0.0001))
