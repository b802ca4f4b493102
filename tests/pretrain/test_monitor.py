"""#19 item 5 on CPU: the progress line, --wandb (offline mode), --monitor-knn (pretrain/monitor.py)."""
import glob
import importlib.util
import os
import re

import pytest
import torch

from common.errors import ConfigError
from pretrain import config, monitor
from pretrain import main as pretrain_main
from tests.pretrain.helpers import read_log, teacher_ckpt, text_log, tiny_args, tiny_data, write_image_folder  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_line_fields_and_one_line_per_student():
    one = dict(key=None, loss=1.5, parts={"token": 0.5, "fea": 0.5, "patch": 0.5}, lr=5e-4, grad_norm=1.25)
    (line,) = monitor.progress_lines("epoch 0 [1/10] step 1/100", [one], 123.4, 0.031, "0:01:00", 38.25)
    for field in ("loss 1.5000", "lr 5.00e-04", "gnorm 1.25", "data 3%", "123.4 img/s", "eta 0:01:00", "mem 38.2G"):
        assert field in line, (field, line)
    three = [dict(one, key=k) for k in ("vit_tiny", "vit_small", "vit_base")]
    lines = monitor.progress_lines("epoch 0 [1/10] step 1/100", three, 123.4, 0.5, "0:01:00", None)
    assert len(lines) == 4 and all(len(x) < 120 for x in lines), lines  # the shared part + one per student
    assert "mem" not in lines[0]  # CPU: no GPU memory
    assert [x.split()[0] for x in lines[1:]] == ["vit_tiny", "vit_small", "vit_base"]
    assert monitor.short_loss_names(["t/token", "t/fea"]) == {"t/token": "token", "t/fea": "fea"}
    assert monitor.short_loss_names(["a/token", "b/token"]) == {"a/token": "a/token", "b/token": "b/token"}


def test_knn_top1_is_dino_weighted_vote():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), dim=1)
    val = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert monitor.knn_top1(train, torch.tensor([0, 0, 1, 1]), val, torch.tensor([0, 1]), 2, k=2) == 100.0
    assert monitor.knn_top1(train, torch.tensor([0, 0, 1, 1]), val, torch.tensor([1, 0]), 2, k=2) == 0.0


def test_monitor_flags_fail_before_any_work(tmp_path, tiny_data, teacher_ckpt, monkeypatch):
    out = str(tmp_path / "run")
    bad = pretrain_main.parse_config(tiny_args(tiny_data, teacher_ckpt, out, monitor_knn=tiny_data))
    with pytest.raises(ConfigError, match="--monitor-knn takes TRAIN_DIR,VAL_DIR"):
        config.validate_config(bad, pretrain_main.KNOBS, world_size=1)
    missing = pretrain_main.parse_config(tiny_args(tiny_data, teacher_ckpt, out, monitor_knn=f"{tiny_data},/nope"))
    with pytest.raises(ConfigError, match="'/nope' is not a folder"):
        config.validate_config(missing, pretrain_main.KNOBS, world_size=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    no_wandb = pretrain_main.parse_config(tiny_args(tiny_data, teacher_ckpt, out, wandb="proj"))
    with pytest.raises(ConfigError, match="the wandb package is not installed"):
        config.validate_config(no_wandb, pretrain_main.KNOBS, world_size=1)
    assert not os.path.exists(out)


def test_knn_monitor_logs_top1_to_log_and_tensorboard(tmp_path, tiny_data, teacher_ckpt):
    val = write_image_folder(tmp_path / "val", n_per_class=3, seed=1)
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=2, pca_every_epochs=0, log_every=3,
                     monitor_knn=f"{tiny_data},{val}", monitor_every=1)
    assert pretrain_main.main(argv) == 0
    rows = [r for r in read_log(out) if "monitor/knn_top1" in r]
    assert [r["monitor/epoch"] for r in rows] == [0, 1] and all(0 <= r["monitor/knn_top1"] <= 100 for r in rows)
    assert re.search(r"kNN monitor after epoch 1 \(EMA\): knn_top1 \d+\.\d\d", text_log(out))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    assert "monitor/knn_top1" in events.Tags()["scalars"]
    assert "train/data_wait" in events.Tags()["scalars"] and "train/grad_norm" in events.Tags()["scalars"]
    line = next(x for x in text_log(out).splitlines() if " step 3/12 " in x)
    for field in ("loss ", "lr ", "gnorm ", "data ", "img/s", "eta "):
        assert field in line, (field, line)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (optional)")
def test_wandb_offline_writes_the_run_and_sends_nothing(tmp_path, tiny_data, teacher_ckpt, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no ~/.config/wandb writes
    out = str(tmp_path / "run")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, wandb="proteus-test")) == 0
    runs = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    assert len(runs) == 1, os.listdir(os.path.join(out, "wandb"))
    assert glob.glob(os.path.join(runs[0], "run-*.wandb"))  # the offline record `wandb sync` would upload
    with open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb") as f:
        record = f.read()  # protobuf records: the logged keys appear as bytes
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/data_wait", "train/img_per_s", "epoch/loss"):
        assert key.encode() in record, key
    assert glob.glob(os.path.join(runs[0], "files", "media", "images", "pca", "*.png"))  # TensorBoard's images too
