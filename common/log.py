"""Logging for training runs: console/file text logs, `log.txt` JSON lines and TensorBoard, rank 0 only."""
import json
import logging
import os
import sys
import time

import torch


def setup_logging(output_dir: str | None = None, rank: int = 0, name: str = "proteus") -> logging.Logger:
    """Root logger to stdout (rank 0: INFO, other ranks: WARNING) and, on rank 0, to output_dir/train.log."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, f"{name}.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    return logging.getLogger(name)


class MetricLogger:
    """Rank-0 sink for scalars: one JSON object per line in log.txt plus TensorBoard scalars/images.

    On other ranks every method is a no-op, so callers never branch on the rank.
    """

    def __init__(self, output_dir: str | None, enabled: bool = True, tensorboard: bool = True,
                 jsonl_name: str = "log.txt"):
        self.enabled = enabled and output_dir is not None
        self.jsonl_path = os.path.join(output_dir, jsonl_name) if self.enabled else None
        self.tb = None
        if self.enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, prefix: str = "", write_json: bool = True, **scalars) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in scalars.items()}
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)
        if write_json:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **{f"{prefix}{k}": v for k, v in clean.items()},
                                    "time": time.time()}) + "\n")

    def image(self, tag: str, img_hwc, step: int) -> None:
        """Log an (H, W, 3) uint8/float image to TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, img_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return float(v)


def write_json(path: str, obj) -> None:
    """Write a JSON file atomically (results.json, config.json): readers never see half a file."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (temp file + rename): readers never see half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str):
    """The JSON value in `path`, or None when the file is missing, unreadable or not JSON (half written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()  # numpy scalars (mmseg metrics come back as numpy float32)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
