"""NYU-Depth V2 evaluation on mmsegmentation (configs in depth/configs, components in depth/heads.py)."""
