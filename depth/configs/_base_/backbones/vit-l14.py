# Proteus ViT-L/14 (distilled from DINOv2-g/14, 1024 wide): every model key of an NYU depth config that
# follows the backbone size, one overlay per head. A leaf lists this file among its bases and merges its head's
# overlay into the model of its head base; `pop` keeps the table itself out of the resolved config:
#     model = _base_.pop('proteus_vit').dpt
__backbone = dict(arch='vit_large', checkpoint='pretrained/proteus-vit-l14.pth', out_indices=[7, 11, 15, 23])
proteus_vit = dict(
    linear=dict(backbone=__backbone, decode_head=dict(in_channels=[1024] * 4)),
    dpt=dict(
        backbone=__backbone,
        decode_head=dict(in_channels=[1024] * 4, embed_dims=1024,
                         post_process_channels=[128, 256, 512, 1024])))
