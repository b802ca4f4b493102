"""Write an image set as WebDataset tar shards for `pretrain.main --data-path 'OUT/shards-{000000..N}.tar'`.

    python -m tools.make_shards /data/imagenet/train /data/in1k-shards --shard-size 1000

Input: an ImageFolder root, a flat folder of images or a text file of paths (what pretrain.main takes).
Each sample is `<index>.<original extension>` (the file's bytes, not re-encoded) plus `<index>.cls` (the
class index, for other tools; pretraining ignores labels). The image order is shuffled once with --seed
so that every shard mixes classes. Also writes `shards.json`, the shard index (wids format:
{"shardlist": [{"url", "nsamples"}]}) that pretrain.main reads for the epoch length, and prints the
--data-path pattern to use. Shards are written to a temporary name and renamed when complete.
"""
import io
import json
import os
import random
import sys
import tarfile

from common import data as cdata
from common.config import CheckedArgumentParser
from common.errors import ConfigError, cli
from common.rundir import check_writable


def source_samples(source: str) -> list[tuple[str, int]]:
    kind = cdata.pretrain_source_kind(source)  # a folder mixing loose images and class folders is refused
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(source)
    else:
        ds = cdata.ImageListDataset(source)
    print(f"read {cdata.describe_source(source, kind, ds)}")
    return list(ds.samples)


def check_output_dir(out_dir: str, source: str) -> None:
    """A writable folder outside the source, holding no shards of an earlier run (nothing is overwritten)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output {out_dir!r} exists and is not a folder; name a new folder")
    src = os.path.realpath(source if os.path.isdir(source) else os.path.dirname(source) or ".")
    real = os.path.realpath(out_dir)
    if real == src or real.startswith(src + os.sep):
        raise ConfigError(f"output {out_dir!r} is inside the source {source!r}; write the shards elsewhere")
    check_writable(out_dir, f"cannot create output folder {out_dir!r} or write in it", "name a writable folder")
    existing = [n for n in os.listdir(out_dir) if n.startswith("shards-") and n.endswith(".tar")]
    if existing:
        raise ConfigError(f"{out_dir!r} already holds {len(existing)} shards (e.g. {existing[0]}); name a new folder "
                          f"(nothing is overwritten)")


def write_shards(samples: list[tuple[str, int]], out_dir: str, shard_size: int, prefix: str = "shards") -> list[dict]:
    """Tar files of `shard_size` samples each; returns the index entries."""
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for start in range(0, len(samples), shard_size):
        name = f"{prefix}-{start // shard_size:06d}.tar"
        path = os.path.join(out_dir, name)
        with tarfile.open(path + ".part", "w") as tar:
            for i, (image_path, target) in enumerate(samples[start:start + shard_size], start):
                ext = os.path.splitext(image_path)[1].lstrip(".").lower() or "jpg"
                with open(image_path, "rb") as f:
                    _add(tar, f"{i:09d}.{ext}", f.read())
                _add(tar, f"{i:09d}.cls", str(target).encode())
        os.replace(path + ".part", path)
        entries.append({"url": name, "nsamples": min(shard_size, len(samples) - start)})
    with open(os.path.join(out_dir, f"{prefix}.json"), "w") as f:
        json.dump({"__kind__": "wids-shard-index-v1", "shardlist": entries}, f, indent=1)
    return entries


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # reproducible archives
    tar.addfile(info, io.BytesIO(payload))


@cli("tools.make_shards")
def main(argv=None) -> int:
    p = CheckedArgumentParser("tools.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="ImageFolder root, flat image folder or text file of image paths")
    p.add_argument("output_dir")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle")
    a = p.parse_args(argv)
    if a.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {a.shard_size}")
    samples = source_samples(a.source)
    check_output_dir(a.output_dir, a.source)
    random.Random(a.seed).shuffle(samples)
    entries = write_shards(samples, a.output_dir, a.shard_size)
    last = len(entries) - 1
    print(f"wrote {len(samples)} samples in {len(entries)} shards; pretrain with --data-path "
          f"'{os.path.join(a.output_dir, f'shards-{{000000..{last:06d}}}.tar')}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
