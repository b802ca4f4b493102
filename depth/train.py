"""Train a depth config: `python -m depth.train CONFIG [--work-dir DIR] [--resume] [--cfg-options ...]`."""
from common.mmseg_plugin.launch import train_main

if __name__ == "__main__":
    train_main("depth")
