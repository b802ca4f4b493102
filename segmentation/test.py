"""Evaluate a segmentation checkpoint (mmseg): `python -m segmentation.test CONFIG CHECKPOINT [--work-dir DIR]
[--cfg-options ...]`; user errors exit 2 with one message."""
import sys

from common.errors import cli
from common.mmseg_plugin.launch import run_test


@cli("segmentation.test")
def main(argv=None) -> int:
    run_test("segmentation", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
