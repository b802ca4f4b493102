"""Checkpoint files that survive crashes: atomic writes, the last K kept, corrupt ones skipped on load.

Layout in a run directory (K = keep_last):
    checkpoint.pth      newest
    checkpoint.1.pth    the one before
    ...                 up to checkpoint.{K-1}.pth
A save writes a temporary file in the same directory, fsyncs it, shifts the history by one and renames
the new file into place, so at every instant at least one complete checkpoint exists on disk: a crash,
a full disk or a kill -9 during a save never damages the previous checkpoint.
Checkpoints hold plain types only (tensors, numbers, strings, lists, dicts) so they load with
`torch.load(weights_only=True)`.
"""
import hashlib
import logging
import os
import tempfile

import torch

log = logging.getLogger(__name__)


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` via temp file + fsync + os.replace. On failure `path` is left untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write checkpoint {path} ({e.strerror}); "
                                   f"the previous file at that path, if any, is intact") from e
        raise


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (a power loss right after os.replace could otherwise undo it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def history_paths(output_dir: str, name: str = "checkpoint.pth", keep_last: int = 2) -> list[str]:
    """[checkpoint.pth, checkpoint.1.pth, ...]: newest first."""
    stem, ext = os.path.splitext(name)
    return [os.path.join(output_dir, name)] + [os.path.join(output_dir, f"{stem}.{i}{ext}")
                                               for i in range(1, keep_last)]


def save_with_history(obj, output_dir: str, name: str = "checkpoint.pth", keep_last: int = 2) -> str:
    """Atomically save `obj` as the newest checkpoint, keeping the previous keep_last-1 ones."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    paths = history_paths(output_dir, name, keep_last)
    os.makedirs(output_dir, exist_ok=True)
    stem, ext = os.path.splitext(name)
    staged = os.path.join(output_dir, f"{stem}.new{ext}")
    atomic_save(obj, staged)  # complete on disk before any existing file moves
    for older, newer in zip(reversed(paths[1:]), reversed(paths[:-1])):
        if os.path.exists(newer):
            os.replace(newer, older)
    os.replace(staged, paths[0])
    _fsync_dir(output_dir)
    return paths[0]


def load_checkpoint(path: str) -> dict:
    """Load one checkpoint (weights_only) or raise ValueError saying it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "this file is not usable"
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def load_latest(output_dir: str, name: str = "checkpoint.pth", keep_last: int = 2):
    """Newest readable checkpoint in `output_dir` as (state, path), or (None, None) if there is none.

    An unreadable newest file is reported and skipped in favour of the previous one; the staged
    `.new` file of a save interrupted between its two renames counts as the newest if it is complete.
    """
    stem, ext = os.path.splitext(name)
    candidates = [os.path.join(output_dir, f"{stem}.new{ext}")] + history_paths(output_dir, name, keep_last)
    existing = [p for p in candidates if os.path.isfile(p)]
    # the staged file is only newer than checkpoint.pth if it was written later
    existing.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for path in existing:
        try:
            return load_checkpoint(path), path
        except ValueError as e:
            log.warning("%s -- falling back to an older checkpoint", e)
    if existing:
        log.warning("no readable checkpoint among %s; starting from scratch", existing)
    return None, None


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Content hash of a file (used to key feature caches by the checkpoint they came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
