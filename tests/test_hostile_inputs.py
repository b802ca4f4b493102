"""Issue #22: hostile and careless inputs end in a correct result or one clear message (exit 2), never a hang, a
silent misread or a late traceback. One section per class of the issue."""
import io
import json
import os
import signal
import subprocess
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.engine import EXIT_PREEMPTED
from test_pretrain_fixtures import (PYTHON, REPO, read_log, teacher_ckpt, tiny_args, tiny_data,  # noqa: F401
                                    write_image_folder)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1"
               b"258daaa5e2ca24d17e2393\nsize 123456789\n")


def start(module: str, argv: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    """A tool as a user starts it: its own process group (signals go to the group, as from SLURM or `timeout`)."""
    return subprocess.Popen([PYTHON, "-m", module, *argv], cwd=REPO, env={**ENV, **(env_extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    return proc.returncode, out, err, time.time() - t0


def run(module: str, argv: list[str], timeout: float = 300, env_extra: dict | None = None):
    return finish(start(module, argv, env_extra), timeout)[:3]


def one_message(rc: int, err: str, *needles: str) -> None:
    """Exit 2, no traceback, and the message says what is wrong."""
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in err, err[-3000:]


# ---- shards written directly (no tool): `n` random JPEG samples per shard -------------------------------------
def write_shard(path: str, n: int, start: int = 0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed + start)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
            for name, payload in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_shard_set(folder, counts: list[int], index_counts: list | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, n in enumerate(counts):
        write_shard(os.path.join(folder, f"shards-{i:06d}.tar"), n, start=100 * i)
    listed = counts if index_counts is None else index_counts
    with open(os.path.join(folder, "shards.json"), "w") as f:
        json.dump({"shardlist": [{"url": f"shards-{i:06d}.tar", "nsamples": n} for i, n in enumerate(listed)]}, f)
    return os.path.join(str(folder), f"shards-{{000000..{len(counts) - 1:06d}}}.tar")


# ==============================================================================================================
# 1. A loop that can make no progress notices; a stop signal always stops the run
# ==============================================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("broken", ["lfs_pointer", "empty", "truncated"])
def test_shard_that_yields_nothing_ends_the_run_with_one_message(tmp_path, teacher_ckpt, broken):
    spec = write_shard_set(tmp_path / "shards", [8, 8])
    bad = str(tmp_path / "shards" / "shards-000001.tar")
    if broken == "lfs_pointer":
        open(bad, "wb").write(LFS_POINTER)
    elif broken == "empty":
        open(bad, "wb").close()
    else:
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[:700])  # the first header, then a few bytes of its image
    argv = tiny_args(spec, teacher_ckpt, str(tmp_path / "run"), num_workers=2, epochs=1)
    rc, _, err, elapsed = finish(start("pretrain.main", argv), timeout=60)  # on its own, 2 workers, 2 cores
    one_message(rc, err, "shards-000001.tar")
    assert not os.path.exists(tmp_path / "run" / "student_backbone.pth")
    if broken == "lfs_pointer":
        assert "git lfs pull" in err


def test_a_shard_emptied_under_a_running_worker_stops_it_with_the_shard_named(tmp_path):
    """The worker-side guard (the file changed after the start-up check): a pass that yields nothing raises."""
    from pretrain import shards

    spec = write_shard_set(tmp_path / "shards", [8, 8])
    stream = shards.ShardStream(spec, lambda img: torch.zeros(3, 8, 8), batch_size=4)
    open(tmp_path / "shards" / "shards-000001.tar", "wb").write(LFS_POINTER)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    t0 = time.time()
    with pytest.raises(shards.EmptyShardsError) as e:
        list(loader)
    assert time.time() - t0 < 30
    assert str(e.value).startswith("shard ") and "shards-000001.tar yielded no sample" in str(e.value)
    assert "Traceback" not in str(e.value)  # the worker's wrapper text is cut back to the message


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@pytest.mark.slow
def test_sigterm_while_the_trainer_waits_for_data_stops_within_seconds(tmp_path, tiny_data, teacher_ckpt):
    """A stuck data worker (here: stopped with SIGSTOP, as on a hung file system) starves the trainer; SIGTERM to the
    process group still ends the run within 10 s with exit 75, and the last checkpoint is intact."""
    out = str(tmp_path / "run")
    proc = start("pretrain.main", tiny_args(tiny_data, teacher_ckpt, out, epochs=1, num_workers=1,
                                            save_every_steps=1, pca_every_epochs=0,
                                            single_image=os.path.join(tiny_data, "n00000000", "0.JPEG"),
                                            single_image_length=4000))
    try:
        def steps() -> int:
            return len([r for r in read_log(out) if "train/loss" in r]) if os.path.exists(os.path.join(out, "log.txt")) \
                else 0

        deadline = time.time() + 180
        while not (steps() >= 3 and os.path.exists(os.path.join(out, "checkpoint.pth"))):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert workers
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        n, still = steps(), 0
        while still < 3:  # the prefetched batches are used up: no step for 3 s
            time.sleep(1)
            still, n = (still + 1, n) if steps() == n else (0, steps())
        step = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["global_step"]
        os.killpg(proc.pid, signal.SIGTERM)
        rc, out_text, err, elapsed = finish(proc, timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == EXIT_PREEMPTED and elapsed < 10, err[-3000:]
    assert "waiting for data" in out_text + err and "Traceback" not in out_text + err
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)  # intact, at the last finished step
    assert ckpt["global_step"] >= step


# ==============================================================================================================
# 2. An ambiguous data layout is never resolved silently
# ==============================================================================================================
def _mixed_root(tmp_path) -> str:
    root = write_image_folder(tmp_path / "mixed", n_per_class=6)
    for i in range(3):  # a few loose images at the top of an ImageFolder root
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(os.path.join(root, f"loose{i}.jpg"))
    return root


def test_imagefolder_with_loose_images_is_refused_by_training_and_make_shards(tmp_path, teacher_ckpt):
    root = _mixed_root(tmp_path)
    rc, _, err = run("pretrain.main", tiny_args(root, teacher_ckpt, str(tmp_path / "run")))
    one_message(rc, err, "mixes 3 loose images", "2 sub-folder(s)")
    assert not os.path.exists(tmp_path / "run")
    from tools import make_shards  # noqa: PLC0415

    rc, _, err = run(make_shards.__name__, [root, str(tmp_path / "shards")])
    one_message(rc, err, "mixes 3 loose images")
    assert not os.path.exists(tmp_path / "shards" / "shards-000000.tar")


def test_the_log_states_what_each_data_path_was_read_as(tmp_path, tiny_data, teacher_ckpt):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(flat / f"{i}.jpg")
    out = str(tmp_path / "run")
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0)
                     + ["--data-path", tiny_data, str(flat)])
    assert rc == 0, err[-3000:]
    text = open(os.path.join(out, "pretrain.log")).read()
    assert f"{tiny_data}: ImageFolder, 24 images in 2 class folders" in text
    assert f"{flat}: flat folder (no class sub-folders), 8 images" in text


# ==============================================================================================================
# 3. Indexes and manifests are checked against what they describe; 0 steps never "finish"
# ==============================================================================================================
@pytest.mark.parametrize("listed,needle", [([-8, 8], "nsamples=-8"), ([800, 8], "can hold at most"),
                                           ([9, 8], "which holds 8"), (["8", 8], "nsamples='8'")])
def test_a_shard_index_that_does_not_describe_the_shards_is_refused(tmp_path, teacher_ckpt, listed, needle):
    spec = write_shard_set(tmp_path / "shards", [8, 8], index_counts=listed)
    out = tmp_path / "run"
    rc, _, err = run("pretrain.main", tiny_args(spec, teacher_ckpt, str(out), epochs=1))
    one_message(rc, err, "does not describe these shards", needle, "delete it")
    assert not os.path.exists(out / "student_backbone.pth")


def test_a_run_that_trains_no_step_neither_exports_nor_exits_0(tmp_path, tiny_data, teacher_ckpt, monkeypatch, capsys):
    """Whatever makes the loader give no batch (here: a data set that claims steps it does not deliver), the run
    does not call an untrained student finished."""
    from pretrain import main as pretrain_main

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: iter(()))
    out = tmp_path / "run"
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(out), epochs=1, pca_every_epochs=0)) == 2
    err = capsys.readouterr().err
    assert "trained 0 steps" in err and "Traceback" not in err
    assert not os.path.exists(out / "student_backbone.pth")


# ==============================================================================================================
# 4. Every tool that writes a run dir takes the run-dir lock, the demo included
# ==============================================================================================================
HOLDER = ("import sys, time; from common.runlock import RunDirLock; l = RunDirLock(sys.argv[1], 'demo output dir')"
          ".acquire(); print('held', flush=True); time.sleep(120)")


def test_a_second_demo_on_the_same_output_dir_stops_before_touching_it(tmp_path):
    from demo import run as demo

    out = tmp_path / "demo"
    for name in (".", *demo.RUN_DIRS):  # a first demo's folders, mid-run
        demo.mark(str(out / name))
    (out / "distil" / "checkpoint.pth").write_bytes(b"the first demo's")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = run("demo.run", ["--output-dir", str(out), "--quick", "--data-dir", str(tmp_path / "data")],
                         timeout=120)
    finally:
        holder.kill()
        holder.wait()
    one_message(rc, err, "is in use by", f"PID {holder.pid}")
    assert (out / "distil" / "checkpoint.pth").read_bytes() == b"the first demo's"
    assert not os.path.exists(tmp_path / "data")  # nothing started


# ==============================================================================================================
# 5. Every value is validated before work starts
# ==============================================================================================================
@pytest.mark.parametrize("module,argv,needle", [
    ("demo.run", ["--time-budget", "inf"], "--time-budget must be a finite number"),
    ("demo.run", ["--time-budget", "nan"], "--time-budget must be a finite number"),
    ("demo.run", ["--lr=-inf"], "--lr must be a finite number"),
    ("demo.run", ["--num-workers", "-1"], "--num-workers must be >= 0"),
    ("demo.run", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("demo.run", ["--epochs", "1", "--warmup-epochs", "3"], "--warmup-epochs 3 is more than --epochs 1"),
    ("linear_eval.main", ["--holdout-fraction", "nan"], "--holdout-fraction must be a finite number"),
    ("pretrain.main", ["--lr", "inf"], "--lr must be a finite number"),
])
def test_non_finite_and_late_failing_values_are_refused_up_front(tmp_path, module, argv, needle):
    out = tmp_path / "out"
    rc, _, err = run(module, ["--output-dir", str(out), *argv], timeout=120)
    one_message(rc, err, needle)
    assert not out.exists()


def test_a_config_file_cannot_smuggle_in_a_non_finite_value(tmp_path, tiny_data, teacher_ckpt):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: .inf\n")
    rc, _, err = run("pretrain.main", ["-c", str(cfg), "--output-dir", str(tmp_path / "o")], timeout=120)
    one_message(rc, err, "must be a finite number")


# ==============================================================================================================
# 6. Parsing is bounded
# ==============================================================================================================
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")  # ~500 bytes, 9^9 strings once expanded
    t0 = time.time()
    rc, _, err = run("pretrain.main", ["-c", str(cfg)], timeout=60)
    one_message(rc, err, "YAML aliases (*a) are not allowed")
    assert time.time() - t0 < 60


# ==============================================================================================================
# 7. The lesser ones
# ==============================================================================================================
FSIZE_RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from pretrain.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_disk_full_from_the_start_stops_at_the_first_save_and_says_nothing_was_saved(tmp_path, tiny_data,
                                                                                      teacher_ckpt):
    from pretrain.state import EXIT_SAVE_FAILED

    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=3, save_every_steps=0, pca_every_epochs=0)
    proc = subprocess.run([PYTHON, "-c", FSIZE_RUNNER, str(200_000), *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_SAVE_FAILED, text[-3000:]
    assert "first checkpoint could not be written" in text and "nothing has been saved" in text
    assert "holds the weights" not in text and "Traceback" not in text
    assert max(r["step"] for r in read_log(out) if "train/loss" in r) == 6  # stopped after epoch 0 (6 steps) of 3


def test_a_timm_vit_student_exports_to_onnx(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0,
                                                student="timm:vit_small_patch14_dinov2",
                                                student_kwargs="depth=1,embed_dim=64,num_heads=2"))
    assert rc == 0, err[-3000:]
    onnx_path = str(tmp_path / "student.onnx")
    rc, stdout, err = run(EXPORT, [os.path.join(out, "student_backbone.pth"), "--to", "onnx", "--output", onnx_path])
    assert rc == 0 and os.path.isfile(onnx_path), err[-3000:]
    assert "Traceback" not in err


EXPORT = "tools.export"


def test_single_image_runs_the_same_output_checks_as_every_data_mode(tmp_path, tiny_data, teacher_ckpt):
    out = tmp_path / "run"
    out.mkdir()
    (out / "vit_tiny-2").write_text("a file where the second student exports")
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, str(out), student="vit_tiny,vit_tiny",
                                                single_image=os.path.join(tiny_data, "n00000000", "0.JPEG")))
    one_message(rc, err, "vit_tiny-2 is a file")
    assert sorted(os.listdir(out)) == ["vit_tiny-2"]  # refused before any work


def test_each_student_records_its_own_scaled_lr(tmp_path, tiny_data, teacher_ckpt):
    out = tmp_path / "run"
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, str(out), epochs=1, pca_every_epochs=0,
                                                student="vit_tiny,vit_tiny", student_lr="0.01,0.2",
                                                lr_reference_batch=4))  # batch 4: lr_scaled == lr
    assert rc == 0, err[-3000:]
    own = {k: json.load(open(out / k / "config.json"))["lr_scaled"] for k in ("vit_tiny", "vit_tiny-2")}
    assert own == {"vit_tiny": pytest.approx(0.01), "vit_tiny-2": pytest.approx(0.2)}


@pytest.mark.parametrize("overrides,needle", [
    (dict(student="timm:resnet18", student_kwargs="features_only=1"), "--student timm:resnet18"),
    (dict(student="timm:resnet18", student_kwargs="in_chans=1"), "--student timm:resnet18"),
    (dict(student="timm:vit_tiny_patch16_224", input_size=14, teacher="dinov2_vits14"), "at --input-size 14"),
    (dict(student="timm:swin_tiny_patch4_window7_224", student_kwargs="", input_size=224), "channels-last"),
    (dict(teacher="timm:resnet18", teacher_checkpoint=""), "--teacher timm:resnet18"),
])
def test_timm_models_that_cannot_run_at_the_size_are_refused_before_any_work(tmp_path, tiny_data, teacher_ckpt,
                                                                              overrides, needle, capsys):
    from pretrain import main as pretrain_main

    out = tmp_path / "run"
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(out), **overrides)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("pretrain.main: error:") and "Traceback" not in err, err
    assert not out.exists()  # before the output dir, the data and the weights


def test_a_teacher_giving_nan_is_named_and_not_blamed_on_the_lr(tmp_path, tiny_data, teacher_ckpt):
    from pretrain.engine import EXIT_NONFINITE

    sd = torch.load(teacher_ckpt, weights_only=True)
    sd["norm.weight"] = torch.full_like(sd["norm.weight"], float("nan"))
    bad = str(tmp_path / "nan_teacher.pth")
    torch.save(sd, bad)
    proc = run("pretrain.main", tiny_args(tiny_data, bad, str(tmp_path / "run"), epochs=1))
    text = proc[1] + proc[2]
    assert proc[0] == EXIT_NONFINITE, text[-3000:]
    assert "teacher dinov2_vits14 gave non-finite outputs" in text and "lower --lr" not in text


def test_a_list_file_with_a_byte_order_mark_is_read(tmp_path, tiny_data, teacher_ckpt):
    listing = tmp_path / "train.txt"
    paths = [os.path.join(tiny_data, c, f"{i}.JPEG") for c in ("n00000000", "n00000001") for i in range(4)]
    listing.write_text("\n".join(paths) + "\n", encoding="utf-8-sig")  # as Windows Notepad saves it
    out = str(tmp_path / "run")
    rc, _, err = run("pretrain.main", tiny_args(str(listing), teacher_ckpt, out, epochs=1, pca_every_epochs=0))
    assert rc == 0, err[-3000:]
    assert f"{listing}: list file, 8 images" in open(os.path.join(out, "pretrain.log")).read()


def test_a_copied_run_resumes_cleanly(tmp_path, tiny_data, teacher_ckpt):
    first, copy = str(tmp_path / "first"), str(tmp_path / "copy")
    argv = tiny_args(tiny_data, teacher_ckpt, first, epochs=1, pca_every_epochs=0)
    rc, _, err = run("pretrain.main", argv)
    assert rc == 0 and os.path.isfile(os.path.join(first, "checkpoint.1.pth")), err[-3000:]
    subprocess.run(["cp", "-r", first, copy], check=True)  # new inodes and times, same contents
    rc, stdout, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, copy, epochs=2, pca_every_epochs=0,
                                                     allow_resume_change="epochs"))
    assert rc == 0, err[-3000:]
    text = stdout + err + open(os.path.join(copy, "pretrain.log")).read()
    assert "resumed from" in text and "not written by this project" not in text
    assert not [n for n in os.listdir(copy) if ".foreign-" in n or ".unreadable-" in n]
