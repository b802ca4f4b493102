"""The feature cache of fine_grained: one file per split, keyed on everything that changes its features or labels.

The key covers the backbone (its weights' content hash and build, `common.probe.backbone_identity`), every
image's fingerprint (path, size, mtime, ctime, inode) and label, the transform, the image size, the number
of CLS tokens kept and the precision. Anything else about the files (a copy, a move, a rewrite) changes a
fingerprint: a cache miss, never a stale hit. Reads and writes are best effort: a broken or unwritable cache
costs time, never a result.
"""
import hashlib
import json
import logging
import os

import torch

from common.checkpoint import atomic_save

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """Outside the repository: ~/.cache/proteus/fine_grained (XDG_CACHE_HOME honoured)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "proteus", "fine_grained")


def backbone_fingerprint(identity: dict) -> str:
    """A `backbone_identity` (its weights' content hash and build) as one stable string."""
    return json.dumps(identity, sort_keys=True)


def cache_key(*parts) -> str:
    """Short stable hash of any JSON-able parts (backbone fingerprint, dataset, root, transform, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(args, fingerprint: str, name: str, ds, transform, n_last: int, precision: str) -> str:
    """The cache file of one split; ds.fingerprint() covers every image and every label."""
    key = cache_key(fingerprint, args.dataset, name, ds.fingerprint(), repr(transform), args.image_size,
                    n_last, precision)
    return os.path.join(args.cache_dir, f"{args.dataset}_{name}_{key}.pt")


def read_cache(path: str | None) -> dict | None:
    """The cached features, or None (no cache, no file, or an unreadable file: then it is re-extracted)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a broken cache file is a cache miss, not a failure
        log.warning("ignoring unreadable feature cache %s (%s: %s); extracting again", path, type(e).__name__, e)
        return None


def write_cache(path: str | None, feats: dict) -> None:
    """Best effort, and atomic (a killed run never leaves half a cache file)."""
    if path is None:
        return
    try:
        atomic_save(feats, path)
    except (OSError, RuntimeError) as e:
        log.warning("could not write the feature cache %s (%s); continuing without it (--cache-dir DIR to "
                    "choose another place, --no-cache to skip)", path, e)
