"""Issue #7 on CPU with tiny models: kill -9 + exact resume, SIGTERM, bad images, corrupt checkpoints, NaN."""
import os
import signal
import subprocess
import time

import pytest
import torch

import models
from pretrain import main as pretrain_main
from pretrain.engine import EXIT_NONFINITE, EXIT_PREEMPTED
from tests import fault_injection
from tests.pretrain.helpers import (ENV, FAULTY_PRETRAIN, PYTHON, REPO, _ckpt, read_log, teacher_ckpt,  # noqa: F401
                                    text_log, tiny_args, tiny_data, train_losses, write_image_folder)
from tests.pretrain.helpers_hostile_inputs import finish, run, start  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"
SIGTERM_EXIT_SECONDS = 30  # documented bound: the rest of one step + one checkpoint write (tiny model: ~1 s)


def _state(path: str) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_kill9_then_same_command_resumes_bitwise(tmp_path, tiny_data, teacher_ckpt):
    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "killed")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, ref_out)) == 0  # uninterrupted, 12 steps
    argv = tiny_args(tiny_data, teacher_ckpt, out)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "8", "--", *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert _state(os.path.join(out, "checkpoint.pth"))["global_step"] == 8  # mid-epoch 1 (batch 2 of 6)
    assert pretrain_main.main(argv) == 0  # the same command
    assert "resumed from" in text_log(out) and "batch 2/6, step 8" in text_log(out)
    for name in ("student_backbone.pth", "student_backbone_ema.pth"):
        ref, got = _state(os.path.join(ref_out, name)), _state(os.path.join(out, name))
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name  # bitwise
    ref_heads, got_heads = _state(os.path.join(ref_out, "checkpoint.pth")), _state(os.path.join(out, "checkpoint.pth"))
    assert all(torch.equal(ref_heads["heads"][h][k], got_heads["heads"][h][k])
               for h in ref_heads["heads"] for k in ref_heads["heads"][h])
    ref_losses, got_losses = train_losses(ref_out), train_losses(out)
    assert all(got_losses[s] == ref_losses[s] for s in range(9, 13))  # the same later losses


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_in_time(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=200, save_every_steps=0)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([PYTHON, "-m", "pretrain.main", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (os.path.exists(os.path.join(out, "log.txt")) and len(read_log(out)) >= 3):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)  # mid-epoch (save_every_steps=0: no step checkpoint before this)
        output, _ = proc.communicate(timeout=SIGTERM_EXIT_SECONDS)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert elapsed < SIGTERM_EXIT_SECONDS
    ckpt = _state(os.path.join(out, "checkpoint.pth"))
    # where it stopped, consistently: a signal during an epoch's last step leaves step_in_epoch == 6 (resumed as
    # an epoch with nothing left to read)
    assert ckpt["global_step"] >= 3 and ckpt["epoch"] * 6 + ckpt["step_in_epoch"] == ckpt["global_step"]
    assert "Run the same command to continue" in output


@pytest.mark.slow
def test_corrupt_and_empty_images_are_skipped_and_counted(tmp_path, teacher_ckpt):
    data = write_image_folder(tmp_path / "train", n_per_class=11)  # 22 good + 2 bad = 24 = 6 full batches
    with open(os.path.join(data, "n00000000", "corrupt.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG body" * 10)
    open(os.path.join(data, "n00000001", "empty.JPEG"), "wb").close()
    out = str(tmp_path / "run")
    assert pretrain_main.main(tiny_args(data, teacher_ckpt, out, epochs=1)) == 0
    epoch_lines = [r for r in read_log(out) if "epoch/bad_images" in r]
    assert epoch_lines[-1]["epoch/bad_images"] == 2
    assert "2 unreadable images skipped" in text_log(out)
    assert os.path.exists(os.path.join(out, "student_backbone.pth"))


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_previous(tmp_path, tiny_data, teacher_ckpt, monkeypatch):
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out)
    with fault_injection.injected(signal_at=4):  # an in-process SIGTERM: stop after step 6 (epoch end)
        assert pretrain_main.main(argv) == EXIT_PREEMPTED
    newest, previous = os.path.join(out, "checkpoint.pth"), os.path.join(out, "checkpoint.1.pth")
    assert _state(newest)["global_step"] == 6 and _state(previous)["global_step"] == 4
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    assert pretrain_main.main(argv) == 0
    log = text_log(out)
    assert "unreadable (truncated or corrupt?)" in log and "falling back to an older checkpoint" in log
    assert f"resumed from {previous}" in log and "step 4" in log
    assert _state(newest)["global_step"] == 12


@pytest.mark.slow
def test_injected_nan_stops_with_message_and_last_good_checkpoint_loads(tmp_path, tiny_data, teacher_ckpt,
                                                                        monkeypatch):
    out = str(tmp_path / "run")
    with fault_injection.injected(nan_at=3):
        assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out)) == EXIT_NONFINITE
    log = text_log(out)
    ckpt_path = os.path.join(out, "checkpoint.pth")
    assert "non-finite loss at step 3" in log and "dinov2_vits14/token=nan dinov2_vits14/fea=nan dinov2_vits14/patch=nan" in log
    assert f"Last good checkpoint: {ckpt_path} (step 2)" in log
    ckpt = _state(ckpt_path)
    assert ckpt["global_step"] == 2
    student = models.build_student("vit_tiny", 14, 56, depth=2, embed_dim=64, num_heads=2)
    models.load_state_dict_checked(student, models.backbone_state_dict(ckpt))
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())


# ---- signals to the whole process group ----------------------------------------------------------------------
def _start_in_own_group(cmd, out):
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while not (os.path.exists(os.path.join(out, "log.txt")) and len(read_log(out)) >= 3):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError("training did not start: " + proc.communicate()[0][-3000:])
        time.sleep(0.2)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_with_workers_checkpoints_and_exits_75(sig, tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=200, save_every_steps=0, num_workers=2,
                     pca_every_epochs=0)
    proc = _start_in_own_group([PYTHON, "-m", "pretrain.main", *argv], out)
    seen = max(r["step"] for r in read_log(out))
    os.killpg(proc.pid, sig)  # what SLURM, `timeout`, container runtimes and Ctrl-C do
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "ConnectionResetError" not in output and "Traceback" not in output
    assert _ckpt(out)["global_step"] >= seen  # nothing since the last log line is lost
    assert "Run the same command to continue" in output


@pytest.mark.slow
def test_sigterm_to_a_torchrun_process_group_checkpoints_and_resumes(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "ddp")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=200, save_every_steps=0, num_workers=1,
                     pca_every_epochs=0)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "pretrain.main",
           *argv]
    proc = _start_in_own_group(cmd, out)
    seen = max(r["step"] for r in read_log(out))
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=90)
    ckpt = _ckpt(out)
    assert ckpt["global_step"] >= seen and len(ckpt["rng"]) == 2, output[-3000:]
    assert "rank0] stopped by a signal after step" in output and "checkpoint written (" in output, output[-3000:]
    # the same command (shortened to the step reached + 1 epoch) continues from that checkpoint
    done = ckpt["global_step"]
    epochs = done // 3 + 1  # 3 steps per epoch per rank on 2 ranks with batch 4 and 24 images (repeated aug 3)
    resumed = subprocess.run(cmd[:-len(argv)] + tiny_args(tiny_data, teacher_ckpt, out, epochs=epochs,
                                                          save_every_steps=0, num_workers=1, pca_every_epochs=0,
                                                          allow_resume_change="epochs"),
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"step {done}" in text_log(out)


@pytest.mark.slow
def test_logged_training_loss_is_the_mean_over_the_log_window(tmp_path, tiny_data, teacher_ckpt):
    per_step, windowed = str(tmp_path / "every"), str(tmp_path / "window")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, per_step, epochs=1, pca_every_epochs=0)) == 0
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, windowed, epochs=1, pca_every_epochs=0,
                                        log_every=3)) == 0
    steps, means = train_losses(per_step), train_losses(windowed)
    assert sorted(means) == [3, 6]
    assert means[3] == pytest.approx(sum(steps[s] for s in (1, 2, 3)) / 3, rel=1e-6)
    assert means[6] == pytest.approx(sum(steps[s] for s in (4, 5, 6)) / 3, rel=1e-6)


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
