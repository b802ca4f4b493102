"""Issue #14 item 4: pretraining data as a flat folder, a list file and WebDataset tar shards.

Shards: written by `python -m tools.make_shards`, streamed by pretrain/shards.py; a kill -9 and resume
gives bitwise the same weights as an uninterrupted run (CPU fp32), with DataLoader workers too; a broken
sample inside a shard is skipped and counted.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import main as pretrain_main
from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, shard_dir, teacher_ckpt,  # noqa: F401
                                    text_log, tiny_args, tiny_data, train_losses, write_image_folder)
from tests.pretrain.helpers_hostile_inputs import finish, one_message, run, start  # noqa: F401

SPEC = "shards-{000000..000004}.tar"


@pytest.mark.slow
def test_shards_kill9_then_resume_is_exact_with_workers(tmp_path, shard_dir, teacher_ckpt):
    workers = 2  # the stronger case: with 0 workers the main process's RNG state alone would suffice
    spec = os.path.join(shard_dir, SPEC)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    argv_ref = tiny_args(spec, teacher_ckpt, ref_out, num_workers=workers, pca_every_epochs=1)
    assert pretrain_main.main(argv_ref) == 0
    assert "data: 24 samples in 5 shards, 6 steps/epoch" in text_log(ref_out)
    argv = tiny_args(spec, teacher_ckpt, out, num_workers=workers, pca_every_epochs=1)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "8", "--", *argv], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["data_state"]  # mid-epoch 1, positions per loader role
    assert pretrain_main.main(argv) == 0
    ref = torch.load(os.path.join(ref_out, "student_backbone.pth"), weights_only=True)
    got = torch.load(os.path.join(out, "student_backbone.pth"), weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(train_losses(out)[s] == train_losses(ref_out)[s] for s in range(9, 13))


@pytest.mark.slow
def test_shard_run_resumed_with_more_cpus_keeps_the_recorded_worker_count(tmp_path, shard_dir, teacher_ckpt,
                                                                          monkeypatch, capsys):
    """--num-workers auto (the default): preempted with 3 CPUs (2 workers), resumed with 5 (auto: 4). The resume
    takes the checkpoint's 2 and ends bitwise where an uninterrupted 3-CPU run does; an explicit 4 is refused."""
    from pretrain.engine import EXIT_PREEMPTED
    from tests import fault_injection

    spec = os.path.join(shard_dir, SPEC)
    cpus = lambda n: monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)  # noqa: E731
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "stopped")
    cpus(3)
    assert pretrain_main.main(tiny_args(spec, teacher_ckpt, ref_out, num_workers="auto", pca_every_epochs=0)) == 0
    argv = tiny_args(spec, teacher_ckpt, out, num_workers="auto", pca_every_epochs=0)
    with fault_injection.injected(signal_at=8):
        assert pretrain_main.main(argv) == EXIT_PREEMPTED
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["config"]["num_workers"] == 2
    cpus(5)
    capsys.readouterr()
    explicit = tiny_args(spec, teacher_ckpt, out, num_workers=4, pca_every_epochs=0)
    assert pretrain_main.main(explicit) == 2
    err = capsys.readouterr().err
    assert "num_workers: checkpoint 2, now 4" in err and "--num-workers 2 or auto" in err, err
    assert "Traceback" not in err
    assert pretrain_main.main(argv) == 0
    assert "resuming with the checkpoint's 2 DataLoader workers per rank (auto gives 4" in text_log(out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_workers"] == 2
    ref = torch.load(os.path.join(ref_out, "student_backbone.pth"), weights_only=True)
    got = torch.load(os.path.join(out, "student_backbone.pth"), weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(train_losses(out)[s] == train_losses(ref_out)[s] for s in range(9, 13))


@pytest.mark.slow
def test_broken_sample_in_a_shard_is_skipped_and_counted(tmp_path, shard_dir, teacher_ckpt):
    bad_dir = tmp_path / "bad"
    shutil.copytree(shard_dir, bad_dir)
    shard = str(bad_dir / "shards-000004.tar")
    with tarfile.open(shard, "a") as tf:  # a 25th sample whose image bytes are not an image
        info = tarfile.TarInfo("999999999.jpg")
        payload = b"not a jpeg at all" * 10
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    os.remove(bad_dir / "shards.json")  # counted from the tar files instead: 25 samples
    out = str(tmp_path / "run")
    assert pretrain_main.main(tiny_args(str(bad_dir / SPEC), teacher_ckpt, out, epochs=1)) == 0
    assert "counting the samples of 5 shards" in text_log(out)
    assert [r for r in read_log(out) if "epoch/bad_images" in r][-1]["epoch/bad_images"] == 1


def test_corrupt_shard_is_a_clear_error(tmp_path, shard_dir, teacher_ckpt, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    os.remove(bad / "shards.json")
    (bad / "shards-000002.tar").write_bytes(b"not a tar file at all" * 100)
    assert pretrain_main.main(tiny_args(str(bad / SPEC), teacher_ckpt, str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "shards-000002.tar is not a readable tar file" in err and "Traceback" not in err


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1"
               b"258daaa5e2ca24d17e2393\nsize 123456789\n")


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


@pytest.mark.slow
def test_a_shard_whose_every_sample_is_unreadable_ends_the_run_with_one_message(tmp_path, teacher_ckpt):
    """A variant of the loop without progress: the shard is a valid tar, but no sample in it decodes (skipped one
    by one under --on-bad-image skip); a whole pass without a usable image stops the run instead of spinning."""
    spec = write_shard_set(tmp_path / "shards", [8, 8])
    bad = str(tmp_path / "shards" / "shards-000001.tar")
    with tarfile.open(bad, "w") as tar:
        for i in range(100, 108):
            for name, payload in ((f"{i:09d}.jpg", b"not a jpeg " * 40), (f"{i:09d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for policy, needle in (("skip", "no readable image"), ("fail", "unreadable sample")):
        # fail: the worker's error reaches the trainer wrapped in torch's traceback text; one line remains
        argv = tiny_args(spec, teacher_ckpt, str(tmp_path / policy), num_workers=2, epochs=1, on_bad_image=policy)
        rc, _, err, elapsed = finish(start("pretrain.main", argv), timeout=60)  # on its own, 2 workers, 2 cores
        one_message(rc, err, "shards-000001.tar", needle)
        assert not os.path.exists(tmp_path / policy / "student_backbone.pth")


@pytest.mark.slow
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


# ==============================================================================================================
# 3. Indexes and manifests are checked against what they describe; 0 steps never "finish"
# ==============================================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("listed,needle", [([-8, 8], "nsamples=-8"), ([800, 8], "can hold at most"),
                                           ([9, 8], "which holds 8"), (["8", 8], "nsamples='8'")])
def test_a_shard_index_that_does_not_describe_the_shards_is_refused(tmp_path, teacher_ckpt, listed, needle):
    spec = write_shard_set(tmp_path / "shards", [8, 8], index_counts=listed)
    out = tmp_path / "run"
    rc, _, err = run("pretrain.main", tiny_args(spec, teacher_ckpt, str(out), epochs=1))
    one_message(rc, err, "does not describe these shards", needle, "delete it")
    assert not os.path.exists(out / "student_backbone.pth")
