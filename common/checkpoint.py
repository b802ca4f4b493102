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

Files the project did not write are never deleted:
- every checkpoint we write is recorded by its content (size + SHA-256 of its first and last MiB) in
  `.checkpoints.json` beside it: a rename and a copy of the run dir (`cp -r`) keep it, so a copied run
  rotates its own checkpoints like the original; a save that would overwrite a file not recorded there
  first moves it aside to `<name>.foreign-<time>`. (Concurrent runs are kept apart by the run-dir lock.)
- a checkpoint that cannot be read (corrupt, or another program's format) is moved aside to
  `<name>.unreadable-<time>` and reported, then the previous one is tried.
Temporary files of an interrupted save (`<name>.<random>.tmp`) are removed by `remove_orphan_temps`.
"""
import hashlib
import json
import logging
import os
import re
import tempfile
import time

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
    ours = _read_manifest(output_dir)

    def move(src: str, dst: str) -> None:  # a rotation only ever overwrites a file we wrote
        if os.path.exists(dst) and not _ours(dst, ours):
            set_aside(dst, "foreign", "it was not written by this project's checkpointing")
        os.replace(src, dst)

    for older, newer in zip(reversed(paths[1:]), reversed(paths[:-1])):
        if os.path.exists(newer):
            move(newer, older)
    move(staged, paths[0])
    _fsync_dir(output_dir)
    _write_manifest(output_dir, [quick_fingerprint(p) for p in paths if os.path.exists(p)])
    return paths[0]


MANIFEST = ".checkpoints.json"
_TEMP_RE = re.compile(r".+\.pth\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_save's mkstemp names


def _ours(path: str, manifest: set) -> bool:
    if quick_fingerprint(path) in manifest:
        return True
    st = os.stat(path)  # a manifest written before content fingerprints: (inode, size, mtime_ns)
    return (st.st_ino, st.st_size, st.st_mtime_ns) in manifest


def _read_manifest(output_dir: str) -> set[tuple]:
    try:
        with open(os.path.join(output_dir, MANIFEST)) as f:
            return {tuple(x) if isinstance(x, list) else x for x in json.load(f)["written"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_manifest(output_dir: str, fingerprints: list) -> None:
    path = os.path.join(output_dir, MANIFEST)
    with open(path + ".part", "w") as f:
        json.dump({"written": list(fingerprints)}, f)
    os.replace(path + ".part", path)


def set_aside(path: str, why: str, reason: str) -> str:
    """Rename `path` to `<path>.<why>-<time>` (never delete it) and say so; returns the new name."""
    new = f"{path}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(new):
        new += "_"
    os.replace(path, new)
    log.warning("%s: %s; moved aside to %s (not deleted)", path, reason, new)
    return new


def remove_orphan_temps(output_dir: str) -> list[str]:
    """Delete the temporary files of saves that were killed mid-write (only our own naming pattern)."""
    removed = []
    for entry in os.scandir(output_dir) if os.path.isdir(output_dir) else ():
        if entry.is_file() and _TEMP_RE.fullmatch(entry.name):
            os.remove(entry.path)
            removed.append(entry.path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted saves: %s", len(removed), ", ".join(removed))
    return removed


def load_checkpoint(path: str) -> dict:
    """Load one checkpoint (weights_only) or raise ValueError saying it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "this file is not usable"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): "
                         f"{type(e).__name__}: {first_line}") from e


def load_latest(output_dir: str, name: str = "checkpoint.pth", keep_last: int = 2, accept=None):
    """Newest readable checkpoint in `output_dir` as (state, path), or (None, None) if there is none.

    An unreadable file, or one `accept(state)` rejects (it returns a reason string, or None to accept),
    is moved aside (never deleted) and the previous one is tried; the staged `.new` file of a save
    interrupted between its two renames counts as the newest if it is complete.
    """
    stem, ext = os.path.splitext(name)
    candidates = [os.path.join(output_dir, f"{stem}.new{ext}")] + history_paths(output_dir, name, keep_last)
    existing = [p for p in candidates if os.path.isfile(p)]
    # the staged file is only newer than checkpoint.pth if it was written later
    existing.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for path in existing:
        try:
            state = load_checkpoint(path)
        except ValueError as e:
            log.warning("%s -- falling back to an older checkpoint", e)
            set_aside(path, "unreadable", "cannot be read with torch.load(weights_only=True)")
            continue
        reason = accept(state) if accept is not None else None
        if reason is None:
            return state, path
        log.warning("checkpoint %s is not usable here: %s -- falling back to an older checkpoint", path, reason)
        set_aside(path, "unreadable", reason)
    if existing:
        log.warning("no readable checkpoint among %s; starting from scratch", existing)
    return None, None


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content: a moved or copied file keeps it, any changed byte changes it. Keys the
    feature caches by the checkpoint they came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def quick_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """Size + SHA-256 of the first and last MiB: a file overwritten in place changes it, a copy does not
    (cheap for multi-GB teacher weights; file_fingerprint reads the whole file)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        h.update(f.read(chunk))
    return f"{size}:{h.hexdigest()[:16]}"
