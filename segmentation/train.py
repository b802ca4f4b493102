"""Train a segmentation config (mmseg): `python -m segmentation.train CONFIG|FAMILY [--backbone RUN [--student KEY]
[--ema]] [--work-dir DIR] [--resume [CKPT]] [--amp] [--scale-lr] [--dry-run] [--cfg-options k=v ...]`;
user errors exit 2 with one message."""
import sys

from common.errors import cli
from common.mmseg_plugin.launch import run_train


@cli("segmentation.train")
def main(argv=None) -> int:
    run_train("segmentation", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
