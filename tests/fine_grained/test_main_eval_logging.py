"""linear_eval and fine_grained log as pretraining does: JSON lines in log.txt and TensorBoard scalars under
tensorboard/; feature extraction and the linear probe's training print progress with img/s and ETA, and the
printed training loss is the mean over the log window."""

import os

import pytest  # noqa: E402

from fine_grained import main as fg_main  # noqa: E402
from tests.linear_eval.helpers_eval_logging import TINY, data, json_lines, tensorboard_scalars  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fine_grained_logs_json_lines_and_tensorboard(data, tmp_path, capsys):
    res = fg_main.run(["--dataset", "imagefolder", "--data-root", data["root"], "--arch", "vit_tiny",
                       "--model-kwargs", TINY, "--image-size", "28", "--num-workers", "0", "--batch-size", "8",
                       "--max-iter", "30", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "fg")])
    out = capsys.readouterr().out
    assert "features imagefolder/train 3/3" in out and "img/s" in out  # 24 images in batches of 8
    lines = json_lines(tmp_path / "fg")
    feats = {line["step"]: line for line in lines if "features/train/img_per_s" in line}
    assert feats[0]["features/train/images"] == 24 and feats[0]["features/train/img_per_s"] > 0
    sweep = [line for line in lines if "sweep/val_score" in line]
    assert [line["step"] for line in sweep] == list(range(45))
    assert [line["sweep/val_score"] for line in sweep] == list(res["val_scores"].values())
    test = [line for line in lines if "test/score" in line]
    assert len(test) == 1 and test[0]["test/score"] == res["test_score"] and test[0]["test/best_C"] == res["best_C"]
    scalars = tensorboard_scalars(tmp_path / "fg")
    assert len(scalars["sweep/val_score"]) == 45 and scalars["test/score"][0][1] == pytest.approx(res["test_score"])
