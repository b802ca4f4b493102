# A timm CNN student (pretrain.main --student timm:resnet50) + UperNet on ADE20K at 518, 60k iterations,
# 4 GPUs x 8 images. The backbone is mmseg's own TIMMBackbone (features_only timm model) loading our
# export student_backbone.pth (the timm model's state dict) through checkpoint_path; no paper number
# (the paper has no CNN students). Other timm students: change model_name and the four in_channels.
_base_ = [
    '../_base_/models/upernet_proteus.py', '../_base_/datasets/ade20k_518.py',
    'mmseg::_base_/default_runtime.py', '../_base_/schedules/schedule_60k.py'
]
model = dict(
    data_preprocessor=dict(test_cfg=dict(size_divisor=32)),
    backbone=dict(
        _delete_=True, type='TIMMBackbone', model_name='resnet50', features_only=True,
        pretrained=False,  # True would ask the hub; our weights come from the file
        checkpoint_path='pretrained/proteus-timm-resnet50.pth', out_indices=(1, 2, 3, 4)),
    neck=None,
    decode_head=dict(in_channels=[256, 512, 1024, 2048], channels=512),
    auxiliary_head=dict(in_channels=1024))
# plain AdamW: the layer-decay constructor follows the ViT's block names
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
train_dataloader = dict(batch_size=8)
