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
        deadline = time.time() + 180
        while not (os.path.exists(os.path.join(out, "log.txt")) and len(read_log(out)) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert workers
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        n, still = len(read_log(out)), 0
        while still < 3:  # the prefetched batches are used up: no step for 3 s
            time.sleep(1)
            still, n = (still + 1, n) if len(read_log(out)) == n else (0, len(read_log(out)))
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
