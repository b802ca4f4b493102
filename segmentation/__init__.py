"""ADE20K semantic segmentation on mmsegmentation (configs in segmentation/configs)."""
