"""Train a segmentation config: `python -m segmentation.train CONFIG [--work-dir DIR] [--resume] [--cfg-options ...]`."""
from common.mmseg_plugin.launch import train_main

if __name__ == "__main__":
    train_main("segmentation")
