"""Every user error of the evaluation entry points (linear_eval, fine_grained, segmentation/depth):
exit code 2, one `prog: error: ...` line naming the problem, no traceback, and no file that existed
before touched. Also: run dirs of other tools are refused, a resume with another backbone is refused."""

import hashlib
import json
import os

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.usefixtures("one_thread")


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]


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
