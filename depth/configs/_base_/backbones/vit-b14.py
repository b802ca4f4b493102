# Proteus ViT-B/14 (distilled from DINOv2-L/14, 768 wide): every model key of an NYU depth config that
# follows the backbone size, one overlay per head. A leaf lists this file among its bases and merges its head's
# overlay into the model of its head base; `pop` keeps the table itself out of the resolved config:
#     model = _base_.pop('proteus_vit').dpt
__backbone = dict(arch='vit_base', checkpoint='pretrained/proteus-vit-b14.pth', out_indices=[3, 5, 7, 11])
proteus_vit = dict(
    linear=dict(backbone=__backbone, decode_head=dict(in_channels=[768] * 4)),
    dpt=dict(
        backbone=__backbone,
        decode_head=dict(in_channels=[768] * 4, embed_dims=768,
                         post_process_channels=[96, 192, 384, 768])))
