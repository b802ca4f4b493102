"""linear_eval and fine_grained log as pretraining does: JSON lines in log.txt and TensorBoard scalars under
tensorboard/; feature extraction and the linear probe's training print progress with img/s and ETA, and the
printed training loss is the mean over the log window."""

import os

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common import probe  # noqa: E402
from linear_eval import engine  # noqa: E402
from linear_eval import main as le_main  # noqa: E402
from tests.linear_eval.helpers_eval_logging import TINY, data, json_lines, tensorboard_scalars  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.usefixtures("one_thread")


def le_argv(data, out, *extra):
    return ["--train-root", data["train"], "--val-root", data["val"], "--arch", "vit_tiny", "--model-kwargs", TINY,
            "--image-size", "28", "--batch-size", "4", "--num-workers", "0", "--lrs", "0.5", "--n-last-blocks", "1",
            "--output-dir", str(out), *extra]


def test_linear_eval_logs_json_lines_tensorboard_and_progress(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(probe, "PROGRESS_SECONDS", 1e9)  # lines by count only, however slow the machine is today
    losses, real_loss = [], engine.grid_loss

    def recorded_loss(logits, targets):
        loss = real_loss(logits, targets)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(engine, "grid_loss", recorded_loss)
    res = le_main.run(le_argv(data, tmp_path / "lin", "--epochs", "1", "--epoch-length", "12", "--eval-period", "6"))
    out = capsys.readouterr().out
    lines = json_lines(tmp_path / "lin")
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [12]  # every 20 iterations, a few seconds, and the last one
    assert train[0]["train/img_per_s"] > 0 and train[0]["train/lr_max"] == 0.0  # cosine ends at 0
    assert len(losses) == 12 and train[0]["train/loss"] == pytest.approx(np.mean(losses), rel=1e-6)  # window mean
    assert train[0]["train/loss"] != pytest.approx(losses[-1], rel=1e-3)  # not the last step's value
    assert [line["step"] for line in lines if "val/top1" in line] == [6, 12]
    final = [line for line in lines if "final/top1" in line]
    assert len(final) == 1 and final[0]["final/top1"] == res["top1"]
    scalars = tensorboard_scalars(tmp_path / "lin")
    assert {"train/loss", "train/img_per_s", "val/top1", "final/top1"} <= set(scalars)
    assert scalars["final/top1"] == [(12, pytest.approx(res["top1"]))]
    assert scalars["train/loss"][0][1] == pytest.approx(train[0]["train/loss"])
    progress = [line for line in out.splitlines() if "it 12/12" in line]  # the training progress line
    assert len(progress) == 1 and "img/s" in progress[0] and "eta 0:00:00" in progress[0]
    assert "eval val 3/3" in out  # the evaluation passes report their throughput too

    le_main.run(le_argv(data, tmp_path / "knn", "--mode", "knn"))
    out = capsys.readouterr().out
    assert "features train 6/6" in out and "features val 3/3" in out and "img/s" in out
    knn = [line for line in json_lines(tmp_path / "knn") if "knn/k10_top1" in line]
    assert len(knn) == 1 and set(tensorboard_scalars(tmp_path / "knn")) >= {"knn/k10_top1", "knn/k20_top5"}
