"""Issue #19: the run dir is what every stage takes, and dense evaluation is keyed by the backbone.

- a tiny depth-2 pretraining run, then linear_eval (linear and kNN) and fine_grained given only the run dir:
  arch / sizes / patch / image size come from its config.json, results land under RUN/eval/, and the
  report on RUN lists them beside the paper's targets;
- a two-student run killed after its first checkpoint: export and fine_grained of `--student vit_tiny`
  from its checkpoint.pth;
- a flag that contradicts the run: exit 2, one line naming both values;
- the dense launcher with backbone A, then the same command with backbone B: refused in the same work dir,
  a fresh work dir by default; never A's metrics under B's name. The batch rule and --dry-run.
"""
import glob
import json
import os
import signal
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import models
from common.errors import ConfigError  # noqa: E402
from common.rundir import claim_run_dir, run_dir_owner, write_config  # noqa: E402
from fine_grained import main as fg_main
from linear_eval import main as le_main
from pretrain import main as pretrain_main
from tests.pretrain.helpers import FAULTY_PRETRAIN, PYTHON, REPO, teacher_ckpt, tiny_args, tiny_data  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_KW = "depth=2,embed_dim=64,num_heads=2"


def write_folder(root, classes=("a", "b"), per_class=4, seed=0, size=32):
    rng = np.random.default_rng(seed)
    for i, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for j in range(per_class):
            img = (rng.random((size, size, 3)) * 80 + 80 * i).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, c, f"{j}.png"))
    return str(root)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaldata")
    write_folder(base / "fg" / "train", per_class=5)
    write_folder(base / "fg" / "test", per_class=2, seed=1)
    return {"train": write_folder(base / "train"), "val": write_folder(base / "val", seed=1), "fg": str(base / "fg")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data, teacher_ckpt) -> str:  # noqa: F811
    out = str(tmp_path_factory.mktemp("run") / "tiny")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0)) == 0
    finally:
        torch.set_num_threads(before)
    return out


def linear_argv(data, *extra):
    return ["--train-root", data["train"], "--val-root", data["val"], "--batch-size", "4", "--epochs", "1",
            "--num-workers", "0", "--eval-period", "2", "--checkpoint-period", "2", "--lrs", "0.01", "0.1",
            "--device", "cpu", *extra]


def fg_argv(data, tmp_path, *extra):
    return ["--dataset", "imagefolder", "--data-root", data["fg"], "--num-workers", "0", "--max-iter", "20",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", *extra]


def test_evaluations_take_the_run_dir_alone(tiny_run, eval_data, tmp_path, capsys):
    linear = le_main.run(linear_argv(eval_data, "--pretrained", tiny_run))
    knn = le_main.run(linear_argv(eval_data, "--pretrained", tiny_run, "--mode", "knn", "--knn-k", "2"))
    fg = fg_main.run(fg_argv(eval_data, tmp_path, "--pretrained", tiny_run))
    export = os.path.join(tiny_run, "student_backbone.pth")
    for results in (linear, knn, fg):  # the run's student, sizes and crop, its finished export
        assert results["arch"] == "vit_tiny" and results["image_size"] == 56 and results["pretrained"] == export
    paths = {name: os.path.join(tiny_run, "eval", *sub, "results.json")
             for name, sub in (("linear", ["linear"]), ("knn", ["knn"]), ("fg", ["fine_grained", "imagefolder"]))}
    for path in paths.values():
        assert os.path.isfile(path), sorted(glob.glob(f"{tiny_run}/eval/**", recursive=True))
    config = json.load(open(os.path.join(tiny_run, "eval", "linear", "config.json")))
    assert config["model_kwargs"] == {"depth": 2, "embed_dim": 64, "num_heads": 2} and config["patch_size"] == 14
    assert config["pretrained_source"] == tiny_run

    from tools import report

    assert report.main([tiny_run, "--output", str(tmp_path / "report")]) == 0
    text = open(tmp_path / "report" / "report.md").read()
    assert f"{linear['top1']:.2f}" in text and f"{fg['test_score']:.2f}" in text
    assert all(p in text for p in paths.values())  # every result read, named in Sources
    assert "paper target" in text and "75.20" in text  # the released ViT-Ti/14's ImageNet linear top-1


def test_export_card_lists_the_runs_evaluations(tiny_run, eval_data, tmp_path):
    fg_main.run(fg_argv(eval_data, tmp_path, "--pretrained", tiny_run))
    from tools import export

    assert export.main([tiny_run, "--to", "timm", "--output", str(tmp_path / "timm")]) == 0
    card = open(tmp_path / "timm" / "README.md").read()
    assert "eval/fine_grained/imagefolder (imagefolder) | test_score" in card


def fake_run(path, arch="vit_small", kwargs="depth=1,embed_dim=32,num_heads=2"):
    """A finished one-student run dir: config.json + export (enough for the flag checks)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"tool": "pretrain", "teacher": "dinov2_vitb14", "student": arch, "student_kwargs": kwargs,
                   "patch_size": 14, "input_size": 28}, f)
    torch.save(models.build_vit(arch, patch_size=14, img_size=28, **models.parse_size_kwargs(kwargs)).state_dict(),
               os.path.join(path, "student_backbone.pth"))
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def dense_error_line(capsys, prog: str) -> str:
    """The one error line of a dense entry point (mmseg's own UserWarnings may precede it on stderr)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def test_a_flag_that_contradicts_the_run_is_an_error_naming_both(tmp_path, eval_data, capsys):
    run = fake_run(tmp_path / "small")
    assert le_main.main(linear_argv(eval_data, "--pretrained", run, "--arch", "vit_base")) == 2
    err = one_error_line(capsys)
    assert "--arch vit_base" in err and "vit_small" in err
    assert fg_main.main(fg_argv(eval_data, tmp_path, "--pretrained", run, "--arch", "vit_base")) == 2
    err = one_error_line(capsys)
    assert "--arch vit_base" in err and "vit_small" in err
    assert fg_main.main(fg_argv(eval_data, tmp_path, "--pretrained", run, "--model-kwargs", "depth=3")) == 2
    assert "depth" in one_error_line(capsys)
    from tools import export

    assert export.main([run, "--to", "dinov2", "--output", str(tmp_path / "x.pth"), "--arch", "vit_base"]) == 2
    err = one_error_line(capsys)
    assert "--arch vit_base" in err and "vit_small" in err
    assert not os.path.exists(os.path.join(run, "eval"))  # refused before anything was written
    # flags that agree with the run, and an image size of its own, are fine
    out = fg_main.run(fg_argv(eval_data, tmp_path, "--pretrained", run, "--arch", "vit_small", "--image-size", "42"))
    assert out["image_size"] == 42


@pytest.fixture(scope="module")
def killed_two_student_run(tmp_path_factory, tiny_data, teacher_ckpt):  # noqa: F811
    out = str(tmp_path_factory.mktemp("killed") / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, student="vit_tiny,vit_small",
                     student_kwargs=f"{TINY_KW};depth=1,embed_dim=32,num_heads=2", pca_every_epochs=0, epochs=2)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "3", "--", *argv], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                 "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "vit_tiny"))  # mid-run: no export yet
    return out


@pytest.mark.slow
def test_a_student_of_a_killed_multi_student_run(killed_two_student_run, eval_data, tmp_path, capsys):
    run = killed_two_student_run
    ckpt = os.path.join(run, "checkpoint.pth")
    step = torch.load(ckpt, weights_only=True)["global_step"]
    from tools import export

    for ema in ((), ("--ema",)):
        out = tmp_path / f"tiny{'_ema' if ema else ''}.pth"
        assert export.main([ckpt, "--student", "vit_tiny", "--to", "dinov2", "--output", str(out), *ema]) == 0
        state = torch.load(ckpt, weights_only=True)["students"]["vit_tiny"]["student_ema" if ema else "student"]
        exported = torch.load(out, weights_only=True)
        assert all(torch.equal(exported[k], state[k]) for k in exported)
    results = fg_main.run(fg_argv(eval_data, tmp_path, "--pretrained", ckpt, "--student", "vit_tiny"))
    assert results["arch"] == "vit_tiny" and results["student"] == "vit_tiny"
    assert os.path.isfile(os.path.join(run, "eval", "vit_tiny", f"step{step}", "fine_grained", "imagefolder",
                                       "results.json"))
    # the run dir alone needs the student; an unknown key names the keys there are
    assert fg_main.main(fg_argv(eval_data, tmp_path, "--pretrained", run)) == 2
    assert "vit_tiny, vit_small" in one_error_line(capsys)
    assert export.main([run, "--student", "vit_base", "--to", "dinov2", "--output", str(tmp_path / "b.pth")]) == 2
    assert "vit_tiny, vit_small" in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Dense: keyed by the backbone
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    pytest.importorskip("mmseg")
    import common.mmseg_plugin  # noqa: F401  (the mmcv.ops shim first)
    from tests.common.mmseg_helpers import tiny_config_file
    from tests.segmentation.test_train import write_ade20k

    base = tmp_path_factory.mktemp("dense")
    config = tiny_config_file(os.path.join(REPO, "segmentation/configs/linear_proteus-vit-s14_4xb8-60k_ade20k-"
                                                 "518x518.py"), write_ade20k(str(base / "ade")), base)
    files = {}
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        files[name] = str(base / f"{name}.pth")
        torch.save(models.build_vit("vit_small", patch_size=14, img_size=56, depth=4, embed_dim=64,
                                    num_heads=2).state_dict(), files[name])
    return config, files


def test_dense_rerun_with_another_backbone_never_gets_the_first_ones_metrics(dense, tmp_path, monkeypatch, capsys):
    from segmentation import test as seg_test
    from segmentation import train as seg_train

    config, files = dense
    work = str(tmp_path / "work")

    def train(name, *extra):
        return seg_train.main([config, "--resume", "--cfg-options", f"model.backbone.checkpoint={files[name]}",
                               f"experiment_name=keyed-{name}-{len(extra)}", *extra])

    assert train("A", "--work-dir", work) == 0
    capsys.readouterr()
    assert train("B", "--work-dir", work) == 2  # the same command with backbone B: refused, one message
    err = dense_error_line(capsys, "segmentation.train")
    assert "A.pth" in err and "B.pth" in err and "another --work-dir" in err
    assert json.load(open(os.path.join(work, "config.json")))["backbone"]["checkpoint"] == files["A"]

    monkeypatch.chdir(tmp_path)  # default work dirs: work_dirs/segmentation/<config>/<backbone hash>
    assert train("A") == 0 and train("B") == 0
    dirs = sorted(glob.glob("work_dirs/segmentation/tiny_config/*"))
    assert len(dirs) == 2
    for name in ("A", "B"):
        assert seg_test.main([config, "--cfg-options", f"model.backbone.checkpoint={files[name]}",
                              f"experiment_name=keyed-test-{name}"]) == 0
    found = [json.load(open(p)) for p in glob.glob("work_dirs/segmentation/tiny_config/*/test/test_metrics.json")]
    by_backbone = {m["backbone"]["checkpoint"]: m for m in found}
    assert set(by_backbone) == {files["A"], files["B"]}  # each model's metrics under its own name ...
    trained_in = {k: os.path.dirname(m["checkpoint"]) for k, m in by_backbone.items()}
    assert trained_in[files["A"]] != trained_in[files["B"]]  # ... from its own training
    # testing A's checkpoint while naming backbone B: refused too
    capsys.readouterr()
    assert seg_test.main([config, by_backbone[files["A"]]["checkpoint"], "--work-dir", str(tmp_path / "t"),
                          "--cfg-options", f"model.backbone.checkpoint={files['B']}"]) == 2
    assert "A.pth" in dense_error_line(capsys, "segmentation.test")


def test_dense_dry_run_and_the_gpu_count_rule(dense, tmp_path, capsys):
    from mmengine.config import Config

    from common.errors import ConfigError
    from common.mmseg_plugin.launch import apply_batch_rule
    from segmentation import train as seg_train

    config, files = dense
    assert seg_train.main([config, "--dry-run", "--work-dir", str(tmp_path / "w"),
                           "--cfg-options", f"model.backbone.checkpoint={files['A']}"]) == 0
    out = capsys.readouterr().out
    assert "ProteusViT" in out and "# work dir:" in out and "A.pth" in out and "# batch:" in out
    assert not os.path.exists(tmp_path / "w")  # nothing written

    name = "upernet_proteus-vit-s14_4xb8-60k_ade20k-518x518.py"

    def fresh():
        return Config.fromfile(os.path.join(REPO, "segmentation/configs", name))

    lr = fresh().optim_wrapper.optimizer.lr
    assert "= 4 x 8" in apply_batch_rule(fresh(), name, 4, False)
    two = fresh()
    apply_batch_rule(two, name, 2, False)  # the recipe's global batch 32 and lr on 2 GPUs
    assert two.train_dataloader.batch_size == 16 and two.optim_wrapper.optimizer.lr == lr
    with pytest.raises(ConfigError, match="does not divide over 3 processes.*--scale-lr"):
        apply_batch_rule(fresh(), name, 3, False)
    scaled = fresh()
    apply_batch_rule(scaled, name, 2, True)  # keep 8 per GPU: global 16, lr halved
    assert scaled.train_dataloader.batch_size == 8 and scaled.optim_wrapper.optimizer.lr == pytest.approx(lr / 2)


def test_dense_launcher_takes_the_run_dir(tiny_run, dense, tmp_path, capsys):
    from segmentation import test as seg_test
    from segmentation import train as seg_train

    config, _ = dense
    # the tiny config's backbone is 4 blocks; the run's student has 2: tap blocks 0 and 1
    argv = [config, "--backbone", tiny_run, "--cfg-options", "model.backbone.out_indices=[0,1]",
            "model.decode_head.in_channels=[64,64]", "model.decode_head.in_index=[0,1]"]
    assert seg_train.main(argv + ["experiment_name=run-train"]) == 0
    work = os.path.join(tiny_run, "eval", "segmentation", "tiny_config")
    marker = json.load(open(os.path.join(work, "config.json")))
    assert marker["backbone"]["arch"] == "vit_tiny" and marker["backbone"]["overrides"] == {"depth": 2, "embed_dim": 64,
                                                                                           "num_heads": 2}
    assert seg_test.main(argv + ["experiment_name=run-test"]) == 0
    assert os.path.isfile(os.path.join(work, "test", "test_metrics.json"))
    capsys.readouterr()
    assert seg_train.main([config, "--backbone", tiny_run, "--cfg-options", "model.backbone.arch=vit_base"]) == 2
    err = dense_error_line(capsys, "segmentation.train")
    assert "vit_base" in err and "vit_tiny" in err

os.environ["HF_HUB_OFFLINE"] = "1"


def test_claim_run_dir_marks_and_recognises_owners(tmp_path):
    fresh = claim_run_dir(str(tmp_path / "new" / "run"), "linear_eval")
    assert os.path.isdir(fresh) and os.listdir(fresh) == [] and run_dir_owner(fresh) is None
    write_config(fresh, "linear_eval", {"lr": 1})
    assert run_dir_owner(fresh) == "linear_eval" and claim_run_dir(fresh, "linear_eval") == fresh
    with pytest.raises(ConfigError, match="belongs to a linear_eval run"):
        claim_run_dir(fresh, "pretrain")
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    torch.save({"grid": {}, "meta": {}}, unmarked / "checkpoint.pth")  # no config.json: no tool's dir ...
    assert run_dir_owner(str(unmarked)) is None
    with pytest.raises(ConfigError, match="already holds checkpoint.pth"):  # ... and still not overwritten
        claim_run_dir(str(unmarked), "linear_eval")


def test_check_writable_tolerates_another_rank_creating_the_dir_first(tmp_path, monkeypatch):
    """Two ranks of one job probe the same new output dir: the one that loses the mkdir race goes on."""
    import os as _os

    from common.rundir import check_writable

    target = tmp_path / "a" / "work"
    real_mkdir = _os.mkdir

    def racing_mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)  # the other rank wins the race ...
        raise FileExistsError(17, "File exists", path)  # ... so this one finds it there

    monkeypatch.setattr(_os, "mkdir", racing_mkdir)
    check_writable(str(target), "cannot write", "fix")
    assert target.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="cannot write"):  # a file in the way is still refused
        check_writable(str(blocker / "sub"), "cannot write", "fix")
