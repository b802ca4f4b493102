"""Train a depth config (mmseg): `python -m depth.train CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
[--cfg-options k=v ...]`; user errors exit 2 with one message."""
import sys

from common.errors import cli
from common.mmseg_plugin.launch import run_train


@cli("depth.train")
def main(argv=None) -> int:
    run_train("depth", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
