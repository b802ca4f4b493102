"""Run directories know which tool made them, so no tool writes into another's.

Every entry point claims its output dir before writing anything and marks it in config.json:

    out = claim_run_dir(args.output_dir, "linear_eval")      # refuses another tool's dir, exit 2
    write_config(out, "linear_eval", vars(args))             # config.json: {"tool": "linear_eval", ...}

`claim_run_dir` refuses (ConfigError, nothing written) a dir that belongs to another tool: its
config.json names another "tool", or, for dirs written before the marker existed, its layout is
recognisably another tool's (a pretrain config.json with "teacher"/"lambda_token", a `<tool>.log`,
a checkpoint.pth whose keys are another tool's). A dir of no known tool is refused only if it already
holds a file this tool would overwrite (`files`). It also refuses a path that is not a directory or
cannot be written, before any heavy work starts.
"""
import json
import os
import tempfile
import zipfile

import torch

from common.errors import ConfigError
from common.log import write_json

CONFIG = "config.json"
TOOL_KEY = "tool"
# What a tool writes into its run dir and so would overwrite (pretrain, mmseg pass their own lists).
DEFAULT_FILES = (CONFIG, "results.json", "checkpoint.pth", "log.txt")

# Dirs from before the "tool" key: config.json keys only one tool writes ...
LEGACY_CONFIG_KEYS = {"pretrain": {"teacher", "lambda_token"},
                      "linear_eval": {"train_root", "val_root", "n_last_blocks"},
                      "fine_grained": {"dataset", "data_root", "multiple"}}
# ... the text log common.log.setup_logging names after the tool ...
LEGACY_LOGS = {"pretrain": "pretrain.log", "linear_eval": "linear_eval.log", "fine_grained": "fine_grained.log"}
# ... and top-level keys of each tool's checkpoint.pth.
CHECKPOINT_KEYS = {"pretrain": "student", "linear_eval": "grid"}


def run_dir_owner(path: str) -> str | None:
    """The tool that wrote run dir `path`, or None (no such dir, empty, or not recognisably any tool's)."""
    if not os.path.isdir(path):
        return None
    config = _read_config(os.path.join(path, CONFIG))
    if isinstance(config, dict):
        if isinstance(config.get(TOOL_KEY), str):
            return config[TOOL_KEY]
        for tool, keys in LEGACY_CONFIG_KEYS.items():
            if keys <= set(config):
                return tool
    for tool, name in LEGACY_LOGS.items():
        if os.path.isfile(os.path.join(path, name)):
            return tool
    return _checkpoint_owner(os.path.join(path, "checkpoint.pth"))


def claim_run_dir(path: str, tool: str, files=DEFAULT_FILES) -> str:
    """Create or reuse `path` as `tool`'s run dir and return its absolute path; ConfigError if it is not ours.

    `files`: names `tool` writes at the top of the dir; a dir of unknown origin holding any of them is
    refused rather than overwritten. Call on every rank (it only reads, creates the dir, and probes it).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output dir {path} exists and is not a directory; pass a new --output-dir")
    owner = run_dir_owner(path)
    if owner is not None and owner != tool:
        raise ConfigError(f"output dir {path} belongs to a {owner} run ({_evidence(path)}); {tool} will not "
                          f"write into it (it would overwrite that run's files); pass a new --output-dir")
    if owner is None:
        clashes = [f for f in files if os.path.exists(os.path.join(path, f))]
        if clashes:
            raise ConfigError(f"output dir {path} already holds {', '.join(clashes)}, not written by {tool}; "
                              f"{tool} will not overwrite them; pass a new or empty --output-dir")
    _check_writable(path)
    return path


def write_config(path: str, tool: str, config: dict) -> None:
    """config.json of a run dir, marked with the tool that owns it (the key claim_run_dir reads)."""
    write_json(os.path.join(path, CONFIG), {**config, TOOL_KEY: tool})


def _read_config(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _checkpoint_owner(path: str) -> str | None:
    """Owner by the checkpoint's top-level keys; mmap + weights_only: cheap, and no code runs."""
    if not os.path.isfile(path) or _is_torchscript(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: not recognisably anyone's (the `files` check still applies)
        return None
    if isinstance(ckpt, dict):
        for tool, key in CHECKPOINT_KEYS.items():
            if key in ckpt:
                return tool
    return None


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive never reaches torch.load, which dispatches those to torch.jit.load (this torch
    refuses that under weights_only; not every version did)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("constants.pkl") for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # not a zip: the legacy pickle format, which weights_only reads safely


def _evidence(path: str) -> str:
    """Why we think so, for the message: the marker, or the legacy files seen."""
    config = _read_config(os.path.join(path, CONFIG))
    if isinstance(config, dict) and TOOL_KEY in config:
        return f"its {CONFIG} says \"{TOOL_KEY}\": \"{config[TOOL_KEY]}\""
    seen = [n for n in (CONFIG, *LEGACY_LOGS.values(), "checkpoint.pth") if os.path.exists(os.path.join(path, n))]
    return "it holds " + ", ".join(seen)


def _check_writable(path: str) -> None:
    """Create the dir and write a probe file: an unwritable dir fails now, not after the heavy work."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to output dir {path} ({e.strerror or e}); pass a writable "
                          f"--output-dir") from e
