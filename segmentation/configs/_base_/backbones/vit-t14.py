# Proteus ViT-Ti/14 (distilled from DINOv2-S/14, 192 wide): every model key of an ADE20K config that
# follows the backbone size, one overlay per head. A leaf lists this file among its bases and merges its head's
# overlay into the model of its head base; `pop` keeps the table itself out of the resolved config:
#     model = _base_.pop('proteus_vit').upernet
__backbone = dict(arch='vit_tiny', checkpoint='pretrained/proteus-vit-t14.pth', out_indices=[3, 5, 7, 11])
proteus_vit = dict(
    linear=dict(backbone=__backbone, decode_head=dict(in_channels=[192] * 4)),
    upernet=dict(
        backbone=dict(__backbone, drop_path_rate=0.1),
        neck=dict(embed_dim=192),
        decode_head=dict(in_channels=[192] * 4, channels=192),
        auxiliary_head=dict(in_channels=192)))
