"""Train a depth config (mmseg): `python -m depth.train CONFIG|FAMILY [--backbone RUN [--student KEY]
[--ema]] [--work-dir DIR] [--resume [CKPT]] [--amp] [--scale-lr] [--dry-run] [--cfg-options k=v ...]`;
user errors exit 2 with one message."""
import sys

from common.errors import cli
from common.mmseg_plugin.launch import run_train


@cli("depth.train")
def main(argv=None) -> int:
    run_train("depth", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
