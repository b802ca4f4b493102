"""Every user error of the evaluation entry points (linear_eval, fine_grained, segmentation/depth):
exit code 2, one `prog: error: ...` line naming the problem, no traceback, and no file that existed
before touched. Also: run dirs of other tools are refused, a resume with another backbone is refused."""

import json
import os
import subprocess
import sys

import pytest  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from fine_grained import main as fg_main  # noqa: E402
from linear_eval import main as le_main  # noqa: E402
from tests.linear_eval.helpers import REPO, TINY, assert_user_error, data, fg_argv, le_argv, pretrain_dir, save_tiny  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.slow
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
