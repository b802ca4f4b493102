"""Shared by tests/segmentation/test_train.py and tests/depth/test_train.py: the train -> val -> resume -> test cycle.

Import only after `common.mmseg_plugin` (it installs the mmcv.ops shim before mmseg's models load).
"""
import glob
import json
import os

import numpy as np
import pytest
import torch
from mmengine.config import Config

from common.mmseg_plugin.compat import mmengine_checkpoint_globals
from common.mmseg_plugin.launch import run_test, run_train
from common.mmseg_plugin.smoke import shrink_config


def tiny_config_file(config, data_root, tmp_path, **kw):
    """The shipped config shrunk to a tiny backbone / crop / 2 iterations, dumped to a file."""
    cfg = shrink_config(Config.fromfile(config), data_root=data_root, **kw)
    path = str(tmp_path / "tiny_config.py")
    cfg.dump(path)
    return path


def read_scalars(work_dir):
    """Every JSON line mmengine logged in work_dir (runs started in the same second share a folder)."""
    runs = sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json")))
    return [json.loads(line) for run in runs for line in open(run)]


def train_resume_test(task, config, data_root, tmp_path, metric, name_len=20):
    """Train 2 iterations (validating at 2), resume to 3, test iter_2.pth; check what every family shares.

    Returns (the validation record of iteration 2, the test metrics); callers check their own values.
    """
    cfg_path = tiny_config_file(config, data_root, tmp_path)
    work = str(tmp_path / "work")
    name = os.path.basename(config)[:name_len]  # unique experiment names: mmengine keys loggers/hubs by them
    run_train(task, [cfg_path, "--work-dir", work, "--cfg-options", f"experiment_name={name}-train"])
    assert os.path.isfile(os.path.join(work, "iter_2.pth"))
    val = {r["step"]: r for r in read_scalars(work) if metric in r}
    assert list(val) == [2]

    run_train(task, [cfg_path, "--work-dir", work, "--resume", "--cfg-options", "train_cfg.max_iters=3",
                     f"experiment_name={name}-resume"])
    records = read_scalars(work)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # resumed at 3, not restarted at 1
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    with mmengine_checkpoint_globals():  # the safe loader, with mmengine's types for this load only
        ckpt = torch.load(os.path.join(work, "iter_3.pth"), map_location="cpu")
    assert ckpt["meta"]["iter"] == 3 and ckpt["optimizer"]["state"]

    metrics = run_test(task, [cfg_path, os.path.join(work, "iter_2.pth"), "--work-dir", str(tmp_path / "test"),
                              "--cfg-options", f"experiment_name={name}-test"])
    written = json.load(open(tmp_path / "test" / "test_metrics.json"))
    assert written["metrics"][metric] == pytest.approx(metrics[metric])
    return val[2], metrics
