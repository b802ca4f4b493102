"""WebDataset-style tar shards for pretraining: `--data-path "/data/in1k/shards-{000000..001281}.tar"`.

Large image sets are streamed on clusters as tar files of a few thousand samples each (one image per
`<key>.jpg`/`.jpeg`/`.png`/`.webp` member; other members, e.g. `<key>.cls`, are ignored: labels are never
used). Reading uses the `webdataset` package (`tarfile_samples`: tar members grouped into samples by key).

Order and resume, exact at step level:
- epoch e: the shard list is shuffled with (seed, e); rank r of R takes every R-th shard; its DataLoader
  workers take every W-th of those. Each worker reads its shards in order (cycling when it runs out, so
  every rank yields exactly `steps_per_epoch` batches) and yields whole batches; the DataLoader takes
  batches from the workers in turn, so batch k of the epoch comes from the worker with role k mod W.
- every sample's augmentation is seeded by (seed, epoch, rank, role, sample position), so a view does not
  depend on which process made it or on what ran before;
- every batch reports how many raw samples its role has read; the trainer keeps the latest count per
  role in the checkpoint (`data_state`), and a resumed epoch skips exactly those samples (read, not
  decoded) and starts each role at its next batch. So kill -9 and resume give the same batches.
Undecodable samples are skipped and counted like unreadable files (`--on-bad-image skip`), or fail.
The epoch length comes from the shard index `<prefix>.json` that `python -m tools.make_shards` writes
(wids format: {"shardlist": [{"url", "nsamples"}]}), or from counting the members once when it is absent.
"""
import json
import logging
import os
import random
import re
import warnings

import numpy as np
import torch
from torch.utils.data import default_collate

from common import data as cdata
from common.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


def is_shard_spec(path: str) -> bool:
    return isinstance(path, str) and (path.endswith(".tar") or bool(re.search(r"\{\d+\.\.\d+\}", path)))


def expand_shards(spec: str) -> list[str]:
    """'shards-{000000..000009}.tar' -> the ten paths (braceexpand), each checked to exist."""
    from braceexpand import braceexpand

    urls = list(braceexpand(spec))
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise MissingFileError(f"--data-path {spec!r}: {len(missing)} of {len(urls)} shard files do not exist "
                               f"(first: {missing[0]}); write shards with `python -m tools.make_shards`")
    return urls


def index_path(urls: list[str]) -> str:
    """The shard index beside the shards: '<dir>/<common prefix without trailing -/_>.json'."""
    stems = [os.path.splitext(os.path.basename(u))[0] for u in urls]
    prefix = os.path.commonprefix(stems).rstrip("-_0123456789") or "shards"
    return os.path.join(os.path.dirname(urls[0]), prefix + ".json")


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard, from the index file if it lists these shards, else by counting (logged).

    The index is checked against the shards it describes: every count a positive integer, no count above
    what the file's size can hold (a tar member takes at least 512 bytes), and the first and last shard
    counted exactly. A wrong index is refused with one message (delete it: the shards are then counted)."""
    path = index_path(urls)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                listed = {os.path.basename(s["url"]): s["nsamples"] for s in json.load(f)["shardlist"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"shard index {path} is not a wids index ({type(e).__name__}: {e}); fix or delete it "
                            f"(the shards are then counted), or rewrite them with tools.make_shards") from None
        if all(os.path.basename(u) in listed for u in urls):
            sizes = [listed[os.path.basename(u)] for u in urls]
            check_index(path, urls, sizes)
            return sizes
    log.info("no shard index %s: counting the samples of %d shards once", path, len(urls))
    return [count_samples(u) for u in urls]


def check_index(path: str, urls: list[str], sizes: list) -> None:
    """DataError unless the index counts are positive integers that fit the shard files (see shard_sizes)."""
    fix = (f"the shard index {path} does not describe these shards; delete it (the shards are then counted "
           f"once) or rewrite the shards with tools.make_shards")
    for url, n in zip(urls, sizes):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"{fix}: it lists nsamples={n!r} for {os.path.basename(url)} (a positive integer is "
                            f"expected)")
        room = os.path.getsize(url) // TAR_BLOCK
        if n > room:
            raise DataError(f"{fix}: it lists {n} samples for {os.path.basename(url)}, but that file "
                            f"({os.path.getsize(url)} bytes) can hold at most {room}")
    for i in dict.fromkeys((0, len(urls) - 1)):  # spot check: two shards counted exactly (headers only)
        counted = count_samples(urls[i])
        if counted != sizes[i]:
            raise DataError(f"{fix}: it lists {sizes[i]} samples for {os.path.basename(urls[i])}, which holds "
                            f"{counted}")


TAR_BLOCK = 512  # every tar member takes a header block: a shard of S bytes holds fewer than S / 512 samples


def check_readable(urls: list[str]) -> None:
    """DataError naming every shard whose first member is not a readable file (one header read per shard).

    A Git-LFS pointer left where a shard should be, an empty or a truncated file yields no sample: streamed,
    its worker would find nothing to batch. Such a set is refused before any work, not skipped: the epoch
    and the sample order would silently differ from what the index describes."""
    import tarfile

    bad = []
    for url in urls:
        why = ""
        try:
            with tarfile.open(url) as tf:
                first = tf.next()
                while first is not None and not first.isfile():
                    first = tf.next()
                if first is None:
                    why = "it holds no file"
                elif len(tf.extractfile(first).read(1)) < min(first.size, 1):
                    why = "truncated"
        except (tarfile.TarError, OSError, EOFError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            with open(url, "rb") as f:
                if f.read(64).startswith(b"version https://git-lfs"):
                    why = "a Git-LFS pointer file, not the shard: run `git lfs pull`"
            bad.append(f"{url} is not a readable tar file ({why})")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} of {len(urls)} shards yield no sample: {'; '.join(bad[:3])}{more}; "
                        f"rewrite them with python -m tools.make_shards or leave them out of --data-path")


def count_samples(url: str) -> int:
    import tarfile

    keys = set()
    try:
        with tarfile.open(url) as tf:
            for m in tf:
                stem, _, ext = os.path.basename(m.name).partition(".")
                if m.isfile() and ext.lower() in IMAGE_KEYS:
                    keys.add(os.path.join(os.path.dirname(m.name), stem))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url} is not a readable tar file ({type(e).__name__}: {e}); rewrite it with "
                        f"python -m tools.make_shards") from None
    return len(keys)


def decode_image(data: bytes, max_pixels):
    """Bytes -> 8-bit RGB PIL image, with the same pixel limit and 16-bit/float handling as files."""
    return cdata._to_rgb8(cdata.open_image_bytes(data, max_pixels=max_pixels))



class ShardStream(torch.utils.data.IterableDataset):
    """Batches of augmented images from tar shards, in the deterministic order described above.

    Yields ((images (B, 3, H, W), zeros (B,)), n_bad, (role, raw samples read by that role)).
    """

    def __init__(self, spec: str, transform, batch_size: int, steps_per_epoch: int | None = None,
                 world_size: int = 1, rank: int = 0, seed: int = 0, on_bad_image: str = "skip"):
        self.urls = expand_shards(spec)
        check_readable(self.urls)
        self.sizes = shard_sizes(self.urls)
        self.transform, self.batch_size = transform, batch_size
        self.world_size, self.rank, self.seed, self.on_bad_image = world_size, rank, seed, on_bad_image
        self.max_pixels = cdata._max_image_pixels
        if len(self.urls) < world_size:
            raise ConfigError(f"{len(self.urls)} shards for {world_size} processes: every rank needs at least one "
                              f"shard; write more, smaller shards (python -m tools.make_shards --shard-size)")
        self.num_samples = sum(self.sizes)
        self.steps_per_epoch = steps_per_epoch or self.num_samples // (world_size * batch_size)
        self.epoch, self.skip_batches, self.raw_done = 0, 0, {}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0, raw_done: dict | None = None) -> None:
        """Start `epoch` after `skip_batches` batches; raw_done: {role: raw samples that role had read}."""
        self.epoch, self.skip_batches, self.raw_done = epoch, skip_batches, dict(raw_done or {})

    def rank_shards(self) -> list[str]:
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank::self.world_size]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.skip_batches) % n_workers  # so request i of the loader is batch skip + i
        shards = self.rank_shards()
        mine = shards[role::n_workers] or shards  # more workers than shards: roles share shards
        first = self.skip_batches + (role - self.skip_batches) % n_workers  # this role's next batch index
        n_batches = len(range(first, self.steps_per_epoch, n_workers))
        return self._batches(mine, role, n_batches, int(self.raw_done.get(role, self.raw_done.get(str(role), 0))))

    def _batches(self, shards: list[str], role: int, n_batches: int, raw_start: int):
        samples = self._samples(shards, raw_start)
        good_pass = 0  # the pass over `shards` that last gave a usable image (pass 0 may start mid-way)
        for _ in range(n_batches):
            images, n_bad = [], 0
            while len(images) < self.batch_size:
                position, sample, pass_no = next(samples)
                view = self._view(sample, role, position)
                if view is not None:
                    good_pass = pass_no
                    images.append(view)
                    continue
                n_bad += 1
                if pass_no - good_pass >= 2:  # a whole pass without one usable image: no progress is possible
                    raise EmptyShardsError(f"shards {', '.join(shards)} gave no readable image in a whole pass "
                                           f"(no {'/'.join(IMAGE_KEYS)} member, undecodable, or over "
                                           f"--max-image-pixels); rewrite them with python -m tools.make_shards")
            collate = getattr(self.transform, "collate", default_collate)  # the GPU path's bytes differ in length
            yield (collate(images), torch.zeros(len(images), dtype=torch.long)), n_bad, (role, position + 1)

    def _samples(self, shards: list[str], raw_start: int):
        """(raw position, sample dict, pass) forever: the role's shards in order, cycling; the first raw_start skipped.

        A shard that yields no sample in a pass raises EmptyShardsError: a loop without progress never spins."""
        from webdataset.tariterators import tarfile_samples

        position, pass_no = 0, 0
        while True:
            for url in shards:
                n = 0
                for sample in tarfile_samples([{"url": url}], handler=_warn_and_continue):
                    n += 1
                    if position >= raw_start:
                        yield position, sample, pass_no
                    position += 1
                if n == 0:
                    raise EmptyShardsError(f"shard {url} yielded no sample (empty, truncated or not a tar file); "
                                           f"rewrite it with python -m tools.make_shards or leave it out of "
                                           f"--data-path")
            pass_no += 1

    def _view(self, sample: dict, role: int, position: int):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            if key is None:
                raise ValueError(f"no image member ({', '.join(IMAGE_KEYS)})")
            seed_sample(self.seed, self.epoch, self.rank, role, position)  # before a lazy decode: it draws the crop
            img = self._decode(sample[key], where)
        except cdata.BAD_IMAGE_ERRORS as e:
            if self.on_bad_image == "fail":
                raise cdata.BadImageError(f"unreadable sample {where}: {e} (use --on-bad-image skip)") from e
            warnings.warn(f"skipping unreadable sample {where}: {e}", stacklevel=1)
            return None
        return self.transform(img)

    def _decode(self, data: bytes, where: str):
        """As files are: a transform that decodes lazily (`decodes`: pretrain/pipeline.py) gets the opened
        header (only the crop's scale is decoded, or on the GPU path nothing); others the decoded image."""
        if getattr(self.transform, "decodes", False):
            return self.transform.decode(cdata.open_image_bytes(data, where, self.max_pixels))
        return decode_image(data, self.max_pixels)


class EmptyShardsError(DataError):
    """Raised in a DataLoader worker; torch re-raises it in the trainer as EmptyShardsError(its own wrapper text
    with the worker's traceback): the message is cut back to the original one line."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def seed_sample(seed: int, epoch: int, rank: int, role: int, position: int) -> None:
    """The augmentation of a sample is a function of where it is in the run, not of the process."""
    s = (seed * 1_000_003 + epoch * 10_007 + rank * 101 + role) * 1_000_033 + position
    s %= 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _warn_and_continue(exn) -> bool:
    warnings.warn(f"skipping part of a shard: {type(exn).__name__}: {exn}", stacklevel=1)
    return True


def collate_shard_batch(item):
    """DataLoader(batch_size=None) passes the worker's batch through; split off the position."""
    batch, n_bad, position = item
    return (batch, n_bad), position


def check_shards(spec: str) -> None:
    """Cheap validation: the files exist and the brace pattern expands."""
    urls = expand_shards(spec)
    if not urls:
        raise DataError(f"--data-path {spec!r} expands to no shard")
