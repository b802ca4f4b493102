"""tools.report: its tables hold the values of the files it read, its PNGs are real pictures, and a run dir
with nothing to report is a user error (exit 2). Real tiny pretrain + linear_eval runs, synthetic others."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fine_grained import summarize
from fine_grained.datasets import PAPER_DATASETS
from linear_eval import main as le_main
from pretrain import main as pretrain_main
from tests.pretrain.helpers import REPO, teacher_ckpt, tiny_args, tiny_data  # noqa: F401
from tools import report

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


# ---- helpers ---------------------------------------------------------------------------------------------
def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_lines(path, rows, tail=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def fine_grained_run(path, dataset, score, pretrained, arch="vit_small", data_root="/data/x"):
    write_json(os.path.join(path, "config.json"), {"tool": "fine_grained", "ema": False, "data_root": data_root})
    write_json(os.path.join(path, "results.json"), {"dataset": dataset, "metric": "accuracy", "test_score": score,
                                                    "arch": arch, "pretrained": pretrained, "best_C": 1.0})
    return str(path)


def colour_folder(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for c, rgb in enumerate([(220, 30, 30), (30, 200, 40), (40, 40, 220)]):
        os.makedirs(os.path.join(root, f"n{c:02d}"), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (28, 28, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(os.path.join(root, f"n{c:02d}", f"{i}.png"))
    return str(root)


def tables(text, heading):
    """The first Markdown table after `## heading` as {first cell: {column: cell}}."""
    lines = text.split(f"## {heading}", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    header, body = rows[0], rows[2:]
    return {r[0]: dict(zip(header[1:], r[1:])) for r in body}


def assert_picture(path):
    """A PNG with real content: axes, text and lines give many colours; a blank canvas has one."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        px = np.asarray(img.convert("RGB"))
    assert px.shape[0] > 200 and px.shape[1] > 300
    packed = px[..., 0].astype(np.int32) << 16 | px[..., 1].astype(np.int32) << 8 | px[..., 2]
    assert len(np.unique(packed)) > 20


def read_report(out):
    with open(os.path.join(out, "report.md")) as f:
        return f.read()


# ---- real tiny runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, tiny_data, teacher_ckpt):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which is per test and so comes after this one
    base = tmp_path_factory.mktemp("runs")
    pre = str(base / "pre")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, pre, epochs=1, pca_every_epochs=0,
                                        save_every_steps=0)) == 0
    backbone = os.path.join(pre, "student_backbone.pth")
    le = str(base / "le")
    le_main.run(["--train-root", colour_folder(base / "in" / "train", 8, 0),
                 "--val-root", colour_folder(base / "in" / "val", 4, 1), "--arch", "vit_tiny",
                 "--model-kwargs", json.dumps(TINY), "--pretrained", backbone, "--image-size", "28",
                 "--batch-size", "8", "--num-workers", "0", "--lrs", "0.1", "--n-last-blocks", "1",
                 "--epochs", "1", "--epoch-length", "4", "--eval-period", "4", "--precision", "fp32",
                 "--output-dir", le])
    torch.set_num_threads(threads)
    return {"base": base, "pre": pre, "le": le, "backbone": backbone}


def test_real_runs_fill_the_results_table_and_plots(real_runs):
    base, backbone = real_runs["base"], real_runs["backbone"]
    fg = [fine_grained_run(base / "fg" / d, d, s, backbone, "vit_tiny") for d, s in (("cars", 41.5), ("dtd", 37.25))]
    write_json(str(base / "seg" / "config.json"), {"tool": "segmentation", "mode": "train", "config": "x.py",
                                                   "cfg_options": {"model.backbone.checkpoint": backbone}})
    write_json(str(base / "seg" / "test_metrics.json"), {"config": "x.py", "checkpoint": "iter_2.pth",
                                                         "metrics": {"aAcc": 70.0, "mIoU": 12.34, "mAcc": 20.0}})
    write_json(str(base / "nyu" / "config.json"), {"tool": "depth", "mode": "test", "config": "y.py",
                                                   "cfg_options": {"model.backbone.checkpoint": backbone}})
    write_json(str(base / "nyu" / "test_metrics.json"), {"metrics": {"rmse": 0.4567, "d1": 0.5}})
    write_json(str(base / "seg2" / "test_metrics.json"), {"config": "segmentation/configs/upernet_s14.py",
                                                          "metrics": {"mIoU": 45.6}})  # no marker, no backbone option

    runs = [real_runs["pre"], real_runs["le"], str(base / "fg"), str(base / "seg"), str(base / "nyu"),
            str(base / "seg2")]
    assert report.main(runs) == 0
    out = os.path.join(real_runs["pre"], "report")  # the default: the first run dir's report/
    text = read_report(out)
    with open(os.path.join(real_runs["le"], "results.json")) as f:
        top1 = json.load(f)["top1"]
    row = tables(text, "Results")["pre: vit_tiny ← dinov2_vits14"]  # one row: all runs evaluated the same file
    assert row == {"ImageNet linear top-1": f"{top1:.2f}", "fine-grained mean (12)": "—", "ADE20K mIoU": "12.34",
                   "NYU RMSE": "0.457"}
    assert tables(text, "Results")["upernet_s14 (backbone as in its config)"]["ADE20K mIoU"] == "45.60"
    fg_row = tables(text, "Fine-grained datasets")["pre: vit_tiny ← dinov2_vits14"]
    assert fg_row == {"cars": "41.50", "dtd": "37.25", "mean (12)": "—"}  # paper order: cars before dtd
    assert "missing aircraft, caltech101, cifar10" in text  # no partial mean, and why

    with open(os.path.join(real_runs["pre"], "log.txt")) as f:
        steps = [r for r in map(json.loads, f) if "train/loss" in r]
    assert f"total loss {steps[0]['train/loss']:.4f} → {steps[-1]['train/loss']:.4f}" in text
    first, last = steps[0]["train/dinov2_vits14/patch"], steps[-1]["train/dinov2_vits14/patch"]
    assert f"| dinov2_vits14 | patch (masked tokens) | {first:.4f} | {last:.4f} |" in text
    for png in ("loss_pre.png", "probe_accuracy.png"):
        assert f"]({png})" in text
        assert_picture(os.path.join(out, png))


# ---- synthetic runs ---------------------------------------------------------------------------------------
def test_fine_grained_mean_needs_all_12_and_matches_summarize(tmp_path):
    scores = {d: 50.0 + 3.1 * i for i, d in enumerate(PAPER_DATASETS)}
    for d, s in scores.items():
        fine_grained_run(tmp_path / "a" / d, d, s, "/ckpt/student_backbone.pth")
    fine_grained_run(tmp_path / "b" / "cars", "cars", 10.0, "none", arch="vit_tiny")
    old = fine_grained_run(tmp_path / "b_old" / "cars", "cars", 99.0, "none", arch="vit_tiny")
    os.utime(os.path.join(old, "results.json"), (1e9, 1e9))  # older: the newer file for the same cell is shown

    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "b_old"),
                        "--output", str(tmp_path / "out")]) == 0
    text = read_report(tmp_path / "out")
    _, mean = summarize.table(summarize.collect(str(tmp_path / "a")))
    row = tables(text, "Fine-grained datasets")["ckpt/student_backbone.pth"]  # no pretrain run beside it
    assert row["mean (12)"] == f"{mean:.2f}" == f"{sum(scores.values()) / 12:.2f}"
    assert [row[d] for d in PAPER_DATASETS] == [f"{s:.2f}" for s in scores.values()]
    assert "vit_tiny, random init" not in tables(text, "Results")  # one dataset: no column of the paper's table
    assert tables(text, "Fine-grained datasets")["vit_tiny, random init"]["cars"] == "10.00"
    assert f"not used: `{os.path.join(old, 'results.json')}` (older than" in text
    assert_picture(tmp_path / "out" / "probe_accuracy.png")


def demo_output(root):
    """The demo's output as demo/run.py writes it, plus keys a newer demo might add."""
    write_json(os.path.join(root, "results.json"), {
        "random_init": 61.45, "distilled": 73.45, "teacher": 76.9, "gap_points": 12.0, "seed": 0,
        "transfer": {"dataset": "digits", "source": "sklearn", "train_images": 800, "random_init": 50.0,
                     "distilled": 65.5, "teacher": 88.25, "gap_points": 15.5},
        "calibration": None, "loss": {"first": 3.0, "last": 1.0}, "something_new": {"nested": [1, 2]},
        "more": {"svhn": {"random_init": 20.0, "distilled": 30.0, "teacher": 40.0}}})
    distil = os.path.join(root, "distil")
    write_json(os.path.join(distil, "config.json"), {"tool": "pretrain", "teacher": "dinov2_vits14",
                                                     "student": "vit_tiny"})
    t = "train/dinov2_vits14"
    first = [{"step": s, "train/loss": 3.0 / s, f"{t}/token": 1.0 / s, f"{t}/fea": 1.2 / s, f"{t}/patch": 0.8 / s,
              "train/lr": 1e-3} for s in (1, 2, 3, 4)]
    resumed = [{"step": 4, "train/loss": 0.7, f"{t}/token": 0.2, f"{t}/fea": 0.3, f"{t}/patch": 0.2},
               {"step": 4, "epoch/loss": 1.0}]  # a resume logs step 4 again: the later row is the run's
    write_lines(os.path.join(distil, "log.txt"), first + resumed, tail='{"step": 5, "train/lo')  # killed mid-line
    probe = os.path.join(root, "probe", "fashion_mnist")
    backbone = os.path.join(distil, "student_backbone.pth")
    fine_grained_run(os.path.join(probe, "distilled"), "imagefolder", 73.45, backbone, data_root="/d/probe_56px")
    fine_grained_run(os.path.join(probe, "odd"), "imagefolder", 5.0, backbone, data_root="/d/cars")
    return distil


def test_demo_output(tmp_path):
    demo_output(str(tmp_path / "demo"))
    assert report.main([str(tmp_path / "demo")]) == 0
    out = tmp_path / "demo" / "report"
    text = read_report(out)
    demo = tables(text, "Demo")
    assert demo["random-init student"] == {"fashion_mnist": "61.45", "digits": "50.00", "svhn": "20.00"}
    assert demo["distilled student"] == {"fashion_mnist": "73.45", "digits": "65.50", "svhn": "30.00"}
    assert demo["teacher"] == {"fashion_mnist": "76.90", "digits": "88.25", "svhn": "40.00"}
    assert demo["distilled - random-init (points)"] == {"fashion_mnist": "+12.00", "digits": "+15.50",
                                                        "svhn": "+10.00"}
    # imagefolder probes are named by their folder, never merged with a paper dataset of the same name
    assert tables(text, "Fine-grained datasets")["distil: vit_tiny ← dinov2_vits14"] == {
        "probe_56px": "73.45", "imagefolder:cars": "5.00", "mean (12)": "—"}
    assert "4 logged steps up to step 4; total loss 3.0000 → 0.7000" in text
    assert "| dinov2_vits14 | token (CLS) | 1.0000 | 0.2000 |" in text
    assert "1 unreadable lines skipped" in text
    assert "## Results" not in text  # the demo gives no column of the paper's table
    assert_picture(out / "demo_accuracy.png")
    assert_picture(out / "loss_distil.png")


def test_several_teachers_get_one_panel_each(tmp_path):
    rows = [{"step": s, "train/loss": 4.0 / s, "train/dinov2_vitb14/token": 1.0 / s, "train/dinov2_vitb14/fea": 1.5 / s,
             "train/dinov2_vitb14/patch": 0.5 / s, "train/clip_vitb16/token": 2.0 / s, "train/grad_norm": 1.0}
            for s in range(1, 30)]
    run = tmp_path / "two"
    write_json(str(run / "config.json"), {"tool": "pretrain", "teacher": "dinov2_vitb14,clip_vitb16",
                                          "student": "vit_small"})
    write_lines(str(run / "log.txt"), rows)
    found = report.scan([str(run)])
    panels = report.loss_panels(found.runs[0])
    assert list(panels) == ["total loss", "teacher dinov2_vitb14", "teacher clip_vitb16"]
    assert list(panels["teacher clip_vitb16"]) == ["token (CLS)"]
    assert panels["teacher dinov2_vitb14"]["patch (masked tokens)"][-1] == (29, 0.5 / 29)
    assert report.main([str(run)]) == 0
    assert "## Pretraining: two: vit_small ← dinov2_vitb14 + clip_vitb16" in read_report(run / "report")
    assert_picture(run / "report" / "loss_two.png")


@pytest.mark.slow
def test_nothing_to_report_is_a_user_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    write_json(str(empty / "notes" / "results.json"), {"foo": 1})  # recognisably no tool's
    assert report.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tools.report: error: nothing to report under") and "looked (recursively) for" in err
    assert "pretrain log.txt" in err and "test_metrics.json" in err and "notes/results.json" in err
    assert not os.path.exists(empty / "report")  # nothing written
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # as a module: one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "tools.report", str(empty)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nothing to report" in proc.stderr
