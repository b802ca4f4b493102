"""Every user error of the evaluation entry points (linear_eval, fine_grained, segmentation/depth):
exit code 2, one `prog: error: ...` line naming the problem, no traceback, and no file that existed
before touched. Also: run dirs of other tools are refused, a resume with another backbone is refused."""
import hashlib
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from common.rundir import claim_run_dir, run_dir_owner, write_config  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from fine_grained import main as fg_main  # noqa: E402
from linear_eval import main as le_main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def write_folder(root, classes=("a", "b"), per_class=4, size=16, seed=0):
    """root/<class>/<i>.png, one noisy colour per class."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(COLOURS[k % 3])[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


def save_tiny(path, seed=0, **extra):
    torch.manual_seed(seed)
    sd = models.build_vit("vit_tiny", patch_size=14, img_size=28, **TINY).state_dict()
    torch.save({"student": sd, **extra}, path)
    return str(path)


def snapshot(root) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under root but the run-dir lock (a refused job takes
    and drops it: bookkeeping, not a result)."""
    from common.runlock import LOCK_NAME

    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f == LOCK_NAME:
                continue
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def assert_user_error(main, argv, capsys, prog, *words, untouched=None, one_line=True):
    """main(argv) returns 2 and prints `prog: error: ...` naming `words`, no traceback; `untouched` unchanged."""
    before = snapshot(untouched) if untouched else None
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, err
    if one_line:
        assert lines == errors, err
    message = errors[0] if one_line else err  # a multi-line message (a layout, a key list) continues below
    for w in words:
        assert w.lower() in message.lower(), message
    if untouched:
        assert snapshot(untouched) == before
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    d = {"train": write_folder(base / "train"), "val": write_folder(base / "val", seed=1),
         "one_class": write_folder(base / "one", classes=("a",)),
         "other_classes": write_folder(base / "other", classes=("a", "c")),
         "fg": str(base / "fg"), "fg_one": str(base / "fg_one")}
    write_folder(base / "fg" / "train", per_class=5)
    write_folder(base / "fg" / "test", per_class=2, seed=1)
    write_folder(base / "fg_one" / "train", classes=("a",), per_class=5)
    write_folder(base / "fg_one" / "test", classes=("a",), per_class=2, seed=1)
    os.makedirs(base / "empty_val" / "a")
    os.makedirs(base / "empty_val" / "b")
    d["empty_val"] = str(base / "empty_val")
    d["ckpt"] = save_tiny(base / "tiny.pth")
    d["ckpt_other"] = save_tiny(base / "tiny_other.pth", seed=1)
    with open(d["ckpt"], "rb") as f:
        blob = f.read()
    d["truncated"] = str(base / "truncated.pth")
    with open(d["truncated"], "wb") as f:
        f.write(blob[: len(blob) // 2])
    return d


def le_argv(data, out, *extra, train=None, val=None):
    return ["--train-root", train or data["train"], "--val-root", val or data["val"], "--arch", "vit_tiny",
            "--model-kwargs", json.dumps(TINY), "--image-size", "28", "--batch-size", "4", "--num-workers", "0",
            "--lrs", "0.1", "--n-last-blocks", "1", "--epochs", "1", "--epoch-length", "2", "--output-dir", str(out),
            *extra]


def fg_argv(root, out, tmp_path, *extra):
    return ["--dataset", "imagefolder", "--data-root", str(root), "--arch", "vit_tiny", "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--image-size", "28", "--num-workers", "0",
            "--model-kwargs", json.dumps(TINY), "--max-iter", "20", *extra]


def pretrain_dir(path, marked=True):
    """A pretrain run dir as pretrain.main leaves it (marked=False: its config.json without the "tool" key)."""
    os.makedirs(path)
    config = {"teacher": "dinov2_vits14", "lambda_token": 1.0, "student": "vit_tiny", "output_dir": str(path)}
    if marked:
        config["tool"] = "pretrain"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_tiny(os.path.join(path, "checkpoint.pth"))
    with open(os.path.join(path, "log.txt"), "w") as f:
        f.write('{"step": 1, "train/loss": 0.5}\n')
    return str(path)


# ---------------------------------------------------------------------------------------------------
# linear_eval
# ---------------------------------------------------------------------------------------------------

def test_linear_eval_data_errors(data, tmp_path, capsys):
    le = le_main.main
    assert_user_error(le, le_argv(data, tmp_path / "o1", train=str(tmp_path / "nowhere")), capsys,
                      "linear_eval.main", "--train-root", "no such directory")
    assert_user_error(le, le_argv(data, tmp_path / "o2", val=data["empty_val"]), capsys, "linear_eval.main",
                      "--val-root", "no image files")
    assert_user_error(le, le_argv(data, tmp_path / "o3", val=data["other_classes"]), capsys, "linear_eval.main",
                      "same class folders", "only in train: ['b']")
    assert_user_error(le, le_argv(data, tmp_path / "o4", train=data["one_class"], val=data["one_class"]), capsys,
                      "linear_eval.main", "1 class folder", "at least 2")
    assert not os.path.exists(tmp_path / "o4" / "results.json")  # no 100 % result


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong_arch", "ema_absent"])
def test_linear_eval_checkpoint_errors(data, tmp_path, capsys, case):
    pretrained = {"missing": str(tmp_path / "absent.pth"), "truncated": data["truncated"], "wrong_arch": data["ckpt"],
                  "ema_absent": data["ckpt"]}[case]
    extra = {"wrong_arch": ["--model-kwargs", json.dumps({**TINY, "embed_dim": 64})], "ema_absent": ["--ema"]}
    words = {"missing": ("no such file", "absent.pth"), "truncated": ("truncated.pth", "checkpoint"),
             "wrong_arch": ("does not fit", "shape"), "ema_absent": ("ema", "tiny.pth")}[case]
    assert_user_error(le_main.main, le_argv(data, tmp_path / "o", "--pretrained", pretrained, *extra.get(case, [])),
                      capsys, "linear_eval.main", *words, one_line=case != "wrong_arch")


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ("--batch-size", ">= 1")),
    (["--eval-period", "0"], ("--eval-period",)),
    (["--lrs", "-1"], ("--lrs", "> 0")),
    (["--holdout-fraction", "1.5"], ("--holdout-fraction",)),
    (["--model-kwargs", "[2]"], ("--model-kwargs", "JSON object")),
    (["--model-kwargs", '{"depth": 0}'], ("depth", "positive")),
    (["--model-kwargs", '{"embed_dim": 33, "num_heads": 2}'], ("divisible",)),
    (["--model-kwargs", '{"colour": 1}'], ("colour",)),
    (["--device", "cuda"], ("cuda",)),
    (["--imagenet-a", "/no/such/imagenet-a"], ("--imagenet-a", "no such directory")),
])
def test_linear_eval_bad_flags_fail_before_work(data, tmp_path, capsys, flags, words):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert_user_error(le_main.main, le_argv(data, tmp_path / "o", *flags), capsys, "linear_eval.main", *words)


def test_linear_eval_unwritable_output_dir(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    assert_user_error(le_main.main, le_argv(data, blocker / "out"), capsys, "linear_eval.main", "output dir",
                      untouched=tmp_path)
    assert_user_error(le_main.main, le_argv(data, blocker), capsys, "linear_eval.main", "not a directory",
                      untouched=tmp_path)


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_linear_eval_refuses_a_pretrain_dir(data, tmp_path, capsys, marked):
    run = pretrain_dir(tmp_path / "pretrain_run", marked=marked)
    msg = assert_user_error(le_main.main, le_argv(data, run), capsys, "linear_eval.main", "pretrain", "--output-dir",
                            untouched=run)
    assert sorted(os.listdir(run)) == ["checkpoint.pth", "config.json", "log.txt"]
    # unmarked: no tool's dir, refused because it holds files linear_eval would overwrite
    assert ("belongs to a pretrain run" if marked else "already holds config.json, checkpoint.pth, log.txt") in msg


def test_linear_eval_refuses_a_dir_of_unknown_files(data, tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.json").write_text('{"my": "own settings"}\n')
    (run / "results.json").write_text('{"top1": 42}\n')
    assert_user_error(le_main.main, le_argv(data, run), capsys, "linear_eval.main", "config.json", "results.json",
                      untouched=run)


@pytest.mark.parametrize("change", ["pretrained", "ema", "image_size", "model_kwargs"])
def test_linear_eval_resume_refuses_another_backbone(data, tmp_path, capsys, change):
    full = save_tiny(tmp_path / "full.pth", student_ema=torch.load(data["ckpt_other"])["student"])
    run = tmp_path / "run"
    assert le_main.main(le_argv(data, run, "--pretrained", full)) == 0
    capsys.readouterr()
    with open(run / "config.json") as f:
        assert json.load(f)["tool"] == "linear_eval"
    again = {"pretrained": ["--pretrained", data["ckpt_other"]], "ema": ["--pretrained", full, "--ema"],
             "image_size": ["--pretrained", full, "--image-size", "42"],
             "model_kwargs": ["--pretrained", full, "--model-kwargs", json.dumps({**TINY, "mlp_ratio": 2.0})]}[change]
    words = {"pretrained": ("backbone weights", "tiny_other.pth"), "ema": ("backbone ema: False -> True",),
             "image_size": ("backbone img_size: 28 -> 42",), "model_kwargs": ("backbone kwargs", "mlp_ratio")}[change]
    assert_user_error(le_main.main, le_argv(data, run, *again), capsys, "linear_eval.main", "different run",
                      "--output-dir", *words, untouched=run)


def test_linear_eval_resume_accepts_the_same_backbone_moved(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert le_main.main(le_argv(data, run, "--pretrained", data["ckpt"])) == 0
    moved = tmp_path / "moved.pth"
    moved.write_bytes(open(data["ckpt"], "rb").read())  # same content, another path
    assert le_main.main(le_argv(data, run, "--pretrained", str(moved))) == 0


# ---------------------------------------------------------------------------------------------------
# fine_grained
# ---------------------------------------------------------------------------------------------------

def test_fine_grained_data_errors(data, tmp_path, capsys):
    fg = fg_main.main
    assert_user_error(fg, fg_argv(tmp_path / "nowhere", tmp_path / "o1", tmp_path), capsys, "fine_grained.main",
                      "imagefolder", "does not exist", one_line=False)  # the layout follows on the next lines
    assert_user_error(fg, fg_argv(data["fg_one"], tmp_path / "o2", tmp_path), capsys, "fine_grained.main",
                      "1 class", "at least 2")
    assert not os.path.exists(tmp_path / "o2" / "results.json")  # no 100 % result


def test_fine_grained_unreadable_image_is_a_data_error(data, tmp_path, capsys):
    root = tmp_path / "broken"
    write_folder(root / "train", per_class=5)
    write_folder(root / "test", per_class=2)
    (root / "test" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_user_error(fg_main.main, fg_argv(root, tmp_path / "o", tmp_path, "--no-cache"), capsys,
                      "fine_grained.main", "unreadable image", "0.png")


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong_arch"])
def test_fine_grained_checkpoint_errors(data, tmp_path, capsys, case):
    pretrained = {"missing": str(tmp_path / "absent.pth"), "truncated": data["truncated"],
                  "wrong_arch": data["ckpt"]}[case]
    extra = ["--model-kwargs", json.dumps({**TINY, "depth": 3})] if case == "wrong_arch" else []
    words = {"missing": ("no such file", "absent.pth"), "truncated": ("truncated.pth", "checkpoint"),
             "wrong_arch": ("does not fit",)}[case]
    assert_user_error(fg_main.main, fg_argv(data["fg"], tmp_path / "o", tmp_path, "--pretrained", pretrained, *extra),
                      capsys, "fine_grained.main", *words, one_line=case != "wrong_arch")


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "0"], ("--image-size",)),
    (["--batch-size", "-2"], ("--batch-size",)),
    (["--resize", "10"], ("--resize",)),
    (["--device", "tpu"], ("tpu",)),
])
def test_fine_grained_bad_flags(data, tmp_path, capsys, flags, words):
    assert_user_error(fg_main.main, fg_argv(data["fg"], tmp_path / "o", tmp_path, *flags), capsys,
                      "fine_grained.main", *words)


def test_fine_grained_refuses_other_tools_dirs(data, tmp_path, capsys):
    run = pretrain_dir(tmp_path / "pretrain_run")
    assert_user_error(fg_main.main, fg_argv(data["fg"], run, tmp_path), capsys, "fine_grained.main", "pretrain",
                      untouched=run)
    le_run = tmp_path / "le"
    assert le_main.main(le_argv(data, le_run)) == 0
    capsys.readouterr()
    assert_user_error(fg_main.main, fg_argv(data["fg"], le_run, tmp_path), capsys, "fine_grained.main",
                      "linear_eval", untouched=le_run)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(fg_main.main, fg_argv(data["fg"], blocker / "sub", tmp_path), capsys, "fine_grained.main",
                      "cannot write", untouched=tmp_path / "le")



def test_an_evaluation_on_a_run_dir_in_use_stops_at_once_and_releases_its_lock(data, tmp_path, capsys):
    """Every tool that writes a run dir takes the run-dir lock: a second job on a held dir stops before any work,
    naming the holder; a finished one leaves the dir free for the next."""
    from common.runlock import RunDirLock

    held = tmp_path / "held"
    with RunDirLock(str(held)):  # another live job holds it
        assert_user_error(le_main.main, le_argv(data, held), capsys, "linear_eval.main", "in use by", "PID")
        assert_user_error(fg_main.main, fg_argv(data["fg"], held, tmp_path), capsys, "fine_grained.main",
                          "in use by")
    assert not (held / "results.json").exists()
    out = tmp_path / "free"
    assert fg_main.main(fg_argv(data["fg"], out, tmp_path)) == 0
    with RunDirLock(str(out)):  # the finished evaluation released it: another job can take it
        pass

# ---------------------------------------------------------------------------------------------------
# timm architectures (--arch timm:<name>)
# ---------------------------------------------------------------------------------------------------

TIMM = ["--arch", "timm:convnext_atto", "--model-kwargs", "{}"]  # after the ViT flags: the last one wins


@pytest.mark.parametrize("tool", ["linear_eval", "fine_grained"])
@pytest.mark.parametrize("case", ["resnet_file", "vit_file", "unknown_model", "bad_kwargs", "last_blocks"])
def test_timm_arch_user_errors(data, tmp_path, capsys, tool, case):
    resnet = str(tmp_path / "resnet.pth")
    if case == "resnet_file":  # another timm architecture's export: same format, other keys
        torch.save(models.build_student("timm:resnet10t", img_size=32).model.state_dict(), resnet)
    extra, words = {
        "resnet_file": (TIMM + ["--pretrained", resnet], ("does not fit timm:convnext_atto", "resnet.pth")),
        "vit_file": (TIMM + ["--pretrained", data["ckpt"]], ("does not fit timm:convnext_atto", "tiny.pth")),
        "unknown_model": (["--arch", "timm:no_such_net", "--model-kwargs", "{}"], ("timm has no model",
                                                                                   "no_such_net")),
        "bad_kwargs": (TIMM[:2] + ["--model-kwargs", '{"depth": 2}'], ("--model-kwargs", "depth",
                                                                       "timm.create_model")),
        "last_blocks": (TIMM + (["--n-last-blocks", "1", "4"] if tool == "linear_eval" else ["--multiple"]),
                        ("only its final features", "--n-last-blocks" if tool == "linear_eval" else "--multiple")),
    }[case]
    main, argv = (le_main.main, le_argv(data, tmp_path / "o", *extra)) if tool == "linear_eval" else \
        (fg_main.main, fg_argv(data["fg"], tmp_path / "o", tmp_path, *extra))
    assert_user_error(main, argv, capsys, f"{tool}.main", *words, one_line=not case.endswith("_file"))


# ---------------------------------------------------------------------------------------------------
# the shared owner check
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# segmentation / depth (mmseg)
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def mmseg_entry_points():
    pytest.importorskip("mmseg")
    from depth import test as depth_test
    from depth import train as depth_train
    from segmentation import test as seg_test
    from segmentation import train as seg_train

    return seg_train.main, seg_test.main, depth_train.main, depth_test.main


SEG_CONFIG = os.path.join(REPO, "segmentation/configs/linear_proteus-vit-t14_4xb8-60k_ade20k-518x518.py")
DEPTH_CONFIG = os.path.join(REPO, "depth/configs/linear_proteus-vit-t14_4xb4-25k_nyu-518x518.py")


def test_dense_entry_points_user_errors(mmseg_entry_points, data, tmp_path, capsys):
    seg_train, seg_test, depth_train, depth_test = mmseg_entry_points
    work = ["--work-dir", str(tmp_path / "work")]
    assert_user_error(seg_train, [str(tmp_path / "none.py"), *work], capsys, "segmentation.train",
                      "config file not found", "segmentation/configs")
    assert_user_error(seg_train, [SEG_CONFIG, *work, "--cfg-options",
                                  f"train_dataloader.dataset.data_root={tmp_path / 'no_ade'}"],
                      capsys, "segmentation.train", "data_root", "no_ade")
    assert_user_error(depth_train, [DEPTH_CONFIG, *work, "--cfg-options",
                                    f"train_dataloader.dataset.data_root={tmp_path / 'no_nyu'}"],
                      capsys, "depth.train", "data_root", "no_nyu")
    assert_user_error(seg_test, [SEG_CONFIG, str(tmp_path / "iter_9.pth"), *work], capsys, "segmentation.test",
                      "checkpoint not found", "iter_9.pth")
    ade = tmp_path / "ade"
    for sub in ("images/training", "annotations/training", "images/validation", "annotations/validation"):
        os.makedirs(ade / sub)
    assert_user_error(seg_train, [SEG_CONFIG, *work, "--cfg-options", f"train_dataloader.dataset.data_root={ade}",
                                  f"val_dataloader.dataset.data_root={ade}",
                                  f"model.backbone.checkpoint={tmp_path / 'backbone.pth'}"],
                      capsys, "segmentation.train", "backbone checkpoint", "backbone.pth")
    nyu = tmp_path / "nyu"
    for sub in ("images/test", "annotations/test"):
        os.makedirs(nyu / sub)
    foreign = pretrain_dir(tmp_path / "a_pretrain_run")
    assert_user_error(depth_test, [DEPTH_CONFIG, data["ckpt"], "--work-dir", foreign, "--cfg-options",
                                   f"test_dataloader.dataset.data_root={nyu}"], capsys, "depth.test",
                      "belongs to a pretrain run", untouched=foreign)
    assert not os.path.exists(tmp_path / "work")  # nothing created for a refused run


def test_dense_config_that_is_not_a_config_is_a_config_error(mmseg_entry_points, data, tmp_path, capsys):
    seg_train, seg_test, depth_train, _ = mmseg_entry_points
    work = ["--work-dir", str(tmp_path / "work")]
    assert_user_error(seg_train, [data["ckpt"], *work], capsys, "segmentation.train", "not an mmengine config",
                      ".py/.yml/.yaml/.json", os.path.basename(data["ckpt"]))
    assert_user_error(seg_test, [data["ckpt"], data["ckpt"], *work], capsys, "segmentation.test",
                      "not an mmengine config")
    (tmp_path / "typo.py").write_text("_base_ = [SEG_BASE]\n")  # a name the config never defines
    assert_user_error(depth_train, [str(tmp_path / "typo.py"), *work], capsys, "depth.train", "typo.py",
                      "NameError", "SEG_BASE")
    (tmp_path / "other_base.py").write_text(f"_base_ = [{data['ckpt']!r}]\n")  # a _base_ that is no config
    assert_user_error(seg_train, [str(tmp_path / "other_base.py"), *work], capsys, "segmentation.train",
                      "other_base.py")
    assert not os.path.exists(tmp_path / "work")


# ---------------------------------------------------------------------------------------------------
# as the user runs them: python -m ..., exit status 2
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, prog", [
    (["-m", "linear_eval.main", "--train-root", "/no/such/train", "--val-root", "/no/such/val", "--output-dir",
      "OUT"], "linear_eval.main"),
    (["-m", "fine_grained.main", "--dataset", "imagefolder", "--data-root", "/no/such/root", "--output-dir", "OUT",
      "--pretrained", "/no/such/ckpt.pth"], "fine_grained.main"),
])
def test_python_m_exits_2_without_traceback(tmp_path, argv, prog):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == \
        [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert "/no/such/" in proc.stderr and not os.path.exists(tmp_path / "out")

