"""linear_eval and fine_grained log as pretraining does: JSON lines in log.txt and TensorBoard scalars under
tensorboard/; feature extraction and the linear probe's training print progress with img/s and ETA, and the
printed training loss is the mean over the log window."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from common import probe  # noqa: E402
from common.probe import Progress  # noqa: E402
from fine_grained import main as fg_main  # noqa: E402
from linear_eval import engine  # noqa: E402
from linear_eval import main as le_main  # noqa: E402

TINY = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2})
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for k, rgb in enumerate(COLOURS):
        os.makedirs(os.path.join(root, f"c{k}"), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (28, 28, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(os.path.join(root, f"c{k}", f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("logdata")
    return {"train": write_folder(base / "train", 8, 0), "val": write_folder(base / "val", 3, 1),
            "test": write_folder(base / "test", 3, 2), "root": str(base)}


def json_lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]  # every line is one JSON object


def tensorboard_scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} read back from the run's events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


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


def test_progress_lines_rate_eta_and_pauses():
    now = [0.0]
    p = Progress("it", total=7, every=3, seconds=100.0, clock=lambda: now[0])
    due = []
    for step in range(1, 8):
        now[0] += 0.5  # 0.5 s per batch of 10 images: 20 img/s
        if step == 4:
            with p.paused():  # an evaluation: neither throughput nor ETA
                now[0] += 30.0
        if p.update(10):
            due.append((p.done, round(p.img_per_s, 6), round(p.eta_s, 6)))
    assert due == [(3, 20.0, 2.0), (6, 20.0, 0.5), (7, 20.0, 0.0)]  # every 3 batches and the last one
    assert p.line == "it 7/7  20.0 img/s  eta 0:00:00"
    slow = Progress("features", total=100, every=50, seconds=10.0, clock=lambda: now[0])
    now[0] += 12.0  # one batch slower than the time limit: a line now, not after 50 batches
    assert slow.update(8) and slow.line.startswith("features 1/100  0.7 img/s  eta 0:19:48")
