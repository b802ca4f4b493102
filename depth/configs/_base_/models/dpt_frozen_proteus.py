# DPT on a frozen Proteus ViT (defaults: ViT-S/14 at 518): the DPT fine-tuning model with the backbone frozen,
# so only the head trains (no stochastic depth in a frozen backbone).
_base_ = ['./dpt_proteus.py']
model = dict(backbone=dict(frozen=True, drop_path_rate=0.0))
