# NYU-Depth V2 (BTS split, layout written by mmseg's tools/dataset_converters/nyu.py) at 518x518.
# Depth PNGs are uint16 millimetres -> metres via depth_rescale_factor. The original's Albumentations
# photometric jitter (RandomBrightnessContrast, RandomGamma, HueSaturationValue) is replaced by mmseg's
# PhotoMetricDistortion: albumentations is not a dependency of this project.
dataset_type = 'NYUDataset'
data_root = 'data/nyu'
crop_size = (518, 518)
meta_keys = ('img_path', 'depth_map_path', 'ori_shape', 'img_shape', 'pad_shape', 'scale_factor', 'flip',
             'flip_direction', 'category_id')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadDepthAnnotation', depth_rescale_factor=1e-3),
    dict(type='RandomDepthMix', prob=0.25),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=(770, 512), ratio_range=(0.8, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs', meta_keys=meta_keys),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2044, 518), keep_ratio=True),
    # ground truth is loaded after Resize: metrics are computed on the original 480x640 maps
    dict(type='LoadDepthAnnotation', depth_rescale_factor=1e-3),
    dict(type='PackSegInputs', meta_keys=meta_keys),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/train', depth_map_path='annotations/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        test_mode=True,
        data_prefix=dict(img_path='images/test', depth_map_path='annotations/test'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
# Eigen crop (rows 45:471, cols 41:601 of the 480x640 ground truth), depths in (1 mm, 10 m).
val_evaluator = dict(type='DepthMetric', min_depth_eval=1e-3, max_depth_eval=10.0, crop_type='nyu_crop')
test_evaluator = val_evaluator
