"""Train a segmentation config: `python -m segmentation.train CONFIG [--work-dir DIR] [--resume] [--cfg-options]`."""
from common.mmseg_plugin.launch import run_train

if __name__ == "__main__":
    run_train("segmentation")
