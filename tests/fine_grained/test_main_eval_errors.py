"""Every user error of the evaluation entry points (linear_eval, fine_grained, segmentation/depth):
exit code 2, one `prog: error: ...` line naming the problem, no traceback, and no file that existed
before touched. Also: run dirs of other tools are refused, a resume with another backbone is refused."""

import json
import os

import pytest  # noqa: E402

from fine_grained import main as fg_main  # noqa: E402
from linear_eval import main as le_main  # noqa: E402
from tests.linear_eval.helpers import TINY, assert_user_error, data, fg_argv, le_argv, pretrain_dir, write_folder  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.usefixtures("one_thread")


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
