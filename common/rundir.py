"""Run directories know which tool made them, so no tool writes into another's.

Every entry point claims its output dir before writing anything and marks it in config.json:

    out = claim_run_dir(args.output_dir, "linear_eval")      # refuses another tool's dir, exit 2
    write_config(out, "linear_eval", vars(args))             # config.json: {"tool": "linear_eval", ...}

`claim_run_dir` refuses (ConfigError, nothing written) a dir that belongs to another tool (its
config.json names another "tool"), and a dir of no known tool that already holds a file this tool would
overwrite (`files`). It also refuses a path that is not a directory or cannot be written, before any heavy
work starts. `check_writable` is that write check, for every tool that writes a file or folder. With
`lock=True` the job's main process also takes the run-dir lock (common/runlock.py) and holds it until the
entry point returns (common.errors.cli releases it), so a second run on the same dir stops at once instead of
mixing its files into the first's.
"""
import contextlib
import os
import tempfile

from common.errors import ConfigError
from common.log import read_json, write_json
from common.runlock import RunDirLock

CONFIG = "config.json"
TOOL_KEY = "tool"
# What a tool writes into its run dir and so would overwrite (pretrain, mmseg pass their own lists).
DEFAULT_FILES = (CONFIG, "results.json", "checkpoint.pth", "log.txt")
_HELD = {}  # path -> RunDirLock held by claim_run_dir(lock=True) until the entry point returns


def run_dir_owner(path: str) -> str | None:
    """The tool that wrote run dir `path` (its config.json's "tool"), or None (no such dir, or unmarked)."""
    config = read_json(os.path.join(path, CONFIG))
    owner = config.get(TOOL_KEY) if isinstance(config, dict) else None
    return owner if isinstance(owner, str) else None


def claim_run_dir(path: str, tool: str, files=DEFAULT_FILES, lock: bool = False) -> str:
    """Create or reuse `path` as `tool`'s run dir and return its absolute path; ConfigError if it is not ours.

    `files`: names `tool` writes at the top of the dir; a dir of unknown origin holding any of them is
    refused rather than overwritten. Call on every rank (it only reads, creates the dir, and probes it);
    `lock`: the main process (torchrun's RANK 0, or no torchrun) holds the run-dir lock until the entry point
    returns.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output dir {path} exists and is not a directory; pass a new --output-dir")
    owner = run_dir_owner(path)
    if owner is not None and owner != tool:
        raise ConfigError(f"output dir {path} belongs to a {owner} run (its {CONFIG} says \"{TOOL_KEY}\": "
                          f"\"{owner}\"); {tool} will not write into it (it would overwrite that run's files); "
                          f"pass a new --output-dir")
    if owner is None:
        clashes = [f for f in files if os.path.exists(os.path.join(path, f))]
        if clashes:
            raise ConfigError(f"output dir {path} already holds {', '.join(clashes)}, not written by {tool}; "
                              f"{tool} will not overwrite them; pass a new or empty --output-dir")
    check_writable(path, f"cannot write to output dir {path}", "pass a writable --output-dir")
    if lock and path not in _HELD and os.environ.get("RANK", "0") == "0":
        _HELD[path] = RunDirLock(path).acquire()
    return path


def release_run_dirs() -> None:
    """Release the run-dir locks claim_run_dir(lock=True) took (the cli boundary calls it on the way out)."""
    while _HELD:
        _HELD.popitem()[1].release()


def write_config(path: str, tool: str, config: dict) -> None:
    """config.json of a run dir, marked with the tool that owns it (the key claim_run_dir reads)."""
    write_json(os.path.join(path, CONFIG), {**config, TOOL_KEY: tool})


def check_writable(folder: str, what: str, fix: str, keep: bool = True) -> None:
    """Create `folder` (and its missing parents) and write and remove a probe file in it, so that an unwritable
    output fails now, not after the heavy work: ConfigError "<what> (<reason>); <fix>" if that fails.

    keep=False removes again the folders it created: a check that leaves nothing behind."""
    missing, parent, created = [], os.path.abspath(folder), []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path)
                created.append(path)
            except FileExistsError:  # another rank of the same job made it first
                if not os.path.isdir(path):
                    raise
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{what} ({e.strerror or e}); {fix}") from None
    finally:
        if not keep:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
