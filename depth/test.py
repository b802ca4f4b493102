"""Evaluate a depth checkpoint: `python -m depth.test CONFIG CHECKPOINT [--cfg-options ...]`."""
from common.mmseg_plugin.launch import run_test

if __name__ == "__main__":
    run_test("depth")
