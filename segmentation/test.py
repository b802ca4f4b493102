"""Evaluate a segmentation checkpoint: `python -m segmentation.test CONFIG CHECKPOINT [--cfg-options ...]`."""
from common.mmseg_plugin.launch import test_main

if __name__ == "__main__":
    test_main("segmentation")
