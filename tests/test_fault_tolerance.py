"""Issue #7 on CPU with tiny models: kill -9 + exact resume, SIGTERM, bad images, corrupt checkpoints, NaN."""
import os
import signal
import subprocess
import time

import torch

import models
import fault_injection
from pretrain import main as pretrain_main
from pretrain.engine import EXIT_NONFINITE, EXIT_PREEMPTED
from test_pretrain_fixtures import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, teacher_ckpt, text_log, tiny_args, tiny_data,  # noqa: F401
                                    train_losses, write_image_folder)

os.environ["HF_HUB_OFFLINE"] = "1"
SIGTERM_EXIT_SECONDS = 30  # documented bound: the rest of one step + one checkpoint write (tiny model: ~1 s)


def _state(path: str) -> dict:
    return torch.load(path, weights_only=True)


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
