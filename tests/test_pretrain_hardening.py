"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoint import save_with_history
from common.runlock import RunDirLock
import fault_injection
from pretrain import config
from pretrain import main as pretrain_main
from pretrain.engine import EXIT_PREEMPTED
from pretrain.state import EXIT_SAVE_FAILED
from test_pretrain_fixtures import (PYTHON, REPO, read_log, teacher_ckpt, text_log, tiny_args, tiny_data,  # noqa: F401
                                    train_losses)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ckpt(out: str, name: str = "checkpoint.pth") -> dict:
    return torch.load(os.path.join(out, name), weights_only=True)


def _stopped_run(tiny_data, teacher_ckpt, out, monkeypatch, at_step: int = 2, **overrides):
    """A tiny run stopped by an in-process SIGTERM after step `at_step` (checkpoint at that step + 0..1)."""
    argv = tiny_args(tiny_data, teacher_ckpt, out, **overrides)
    with fault_injection.injected(signal_at=at_step):
        assert pretrain_main.main(argv) == EXIT_PREEMPTED
    return argv


# ---- resume refuses a changed configuration --------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_dir(tmp_path_factory, tiny_data, teacher_ckpt):
    """One stopped run, copied by each test that only reads it (a resume refused before any work)."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    mp = pytest.MonkeyPatch()
    try:
        _stopped_run(tiny_data, teacher_ckpt, out, mp)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("change,key", [
    (dict(lr=0.1), "lr"), (dict(seed=7), "seed"), (dict(mask_ratio=[0.3]), "mask_ratio"),
    (dict(batch_size=3), "global_batch"), (dict(epochs=3), "epochs"),
])
def test_resume_with_a_changed_flag_is_refused_before_any_work(change, key, tmp_path, tiny_data, teacher_ckpt,
                                                               stopped_dir, capsys):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(stopped_dir, out)
    before = {n: _sha(os.path.join(out, n)) for n in ("checkpoint.pth", "config.json", "log.txt")}
    capsys.readouterr()
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, **change)) == 2
    err = capsys.readouterr().err
    assert f"  {key}: checkpoint" in err and "Traceback" not in err, err
    assert {n: _sha(os.path.join(out, n)) for n in before} == before  # nothing rewritten


def test_changed_data_path_is_refused(tmp_path, tiny_data, teacher_ckpt, stopped_dir, capsys):
    import shutil

    from test_pretrain_fixtures import write_image_folder

    out = str(tmp_path / "run")
    shutil.copytree(stopped_dir, out)
    other = write_image_folder(tmp_path / "other", seed=1)
    assert pretrain_main.main(tiny_args(other, teacher_ckpt, out)) == 2
    assert "  data_path: checkpoint" in capsys.readouterr().err


def test_extending_epochs_with_allow_resume_change_rebuilds_the_schedule(tmp_path, tiny_data, teacher_ckpt):
    from common.optim import cosine_lr_at

    out = str(tmp_path / "run")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, warmup_epochs=0)) == 0  # 6 steps
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=2, warmup_epochs=0, allow_resume_change="epochs")
    assert pretrain_main.main(argv) == 0
    assert _ckpt(out)["global_step"] == 12
    lrs = {r["step"]: r["train/lr"] for r in read_log(out) if "train/lr" in r}
    peak, floor = 0.05 * 4 / 512, 1e-5 * 4 / 512  # the default --min-lr scales with the batch as the lr (#19)
    for step in range(7, 13):  # logged after step index step-1, on the new 12-step cosine
        assert lrs[step] == pytest.approx(cosine_lr_at(step - 1, peak, 12, 0, floor, 1e-6), rel=1e-6)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["epochs"] == 2 and cfg["resume_changes"] == [{"step": 6, "changes": {"epochs": [1, 2]}}]
    assert cfg["tool"] == "pretrain" and cfg["resumed_from"].endswith("checkpoint.pth")


def test_allow_resume_change_rejects_keys_that_cannot_change(tmp_path, tiny_data, teacher_ckpt, capsys):
    argv = tiny_args(tiny_data, teacher_ckpt, str(tmp_path / "run"), allow_resume_change="seed")
    assert pretrain_main.main(argv) == 2
    assert "cannot change on resume" in capsys.readouterr().err


# ---- one run per directory -------------------------------------------------------------------------------
HOLDER = ("import sys; from common.runlock import RunDirLock; l = RunDirLock(sys.argv[1]).acquire(); "
          "print('locked', flush=True); sys.stdin.read()")


def test_second_run_on_a_directory_fails_naming_the_holder_and_a_killed_holder_does_not_block(
        tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, out], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([PYTHON, "-m", "pretrain.main", *tiny_args(tiny_data, teacher_ckpt, out, epochs=1)],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {holder.pid} on host" in second.stderr and "Traceback" not in second.stderr
        assert not os.path.exists(os.path.join(out, "config.json"))
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1)) == 0


def test_lock_is_exclusive_in_process(tmp_path):
    with RunDirLock(str(tmp_path)):
        with pytest.raises(Exception, match=f"PID {os.getpid()}"):
            RunDirLock(str(tmp_path)).acquire()
    RunDirLock(str(tmp_path)).acquire().release()  # free again


# ---- foreign and unreadable checkpoints are set aside, never deleted ----------------------------------------
def test_original_proteus_checkpoint_in_the_run_dir_is_set_aside_not_deleted(tmp_path, tiny_data, teacher_ckpt,
                                                                               monkeypatch):
    import argparse

    out = str(tmp_path / "run")
    argv = _stopped_run(tiny_data, teacher_ckpt, out, monkeypatch, at_step=4)  # checkpoint.pth @6, .1 @4
    foreign = os.path.join(out, "checkpoint.pth")
    torch.save({"model": {"student.backbone.cls_token": torch.zeros(1, 1, 8)}, "optimizer": {},
                "args": argparse.Namespace(lr=5e-4), "epoch": 3}, foreign)  # weights_only refuses Namespace
    digest = _sha(foreign)
    assert pretrain_main.main(argv) == 0
    aside = [n for n in os.listdir(out) if n.startswith("checkpoint.pth.unreadable-")]
    assert len(aside) == 1 and _sha(os.path.join(out, aside[0])) == digest
    assert "moved aside" in text_log(out) and "step 4" in text_log(out)  # resumed from checkpoint.1.pth
    assert _ckpt(out)["global_step"] == 12


def test_rotation_never_overwrites_a_file_it_did_not_write(tmp_path):
    out = str(tmp_path)
    save_with_history({"step": 0}, out, keep_last=2)
    torch.save({"precious": torch.ones(3)}, os.path.join(out, "checkpoint.1.pth"))  # a user's file in the slot
    digest = _sha(os.path.join(out, "checkpoint.1.pth"))
    save_with_history({"step": 1}, out, keep_last=2)  # rotates checkpoint.pth onto checkpoint.1.pth
    aside = [n for n in os.listdir(out) if n.startswith("checkpoint.1.pth.foreign-")]
    assert len(aside) == 1 and _sha(os.path.join(out, aside[0])) == digest
    save_with_history({"step": 2}, out, keep_last=2)  # our own files rotate as before
    assert torch.load(os.path.join(out, "checkpoint.1.pth"))["step"] == 1
    assert len([n for n in os.listdir(out) if ".foreign-" in n]) == 1


def test_orphan_temp_files_of_killed_saves_are_removed_at_start(tmp_path, tiny_data, teacher_ckpt):
    out = tmp_path / "run"
    out.mkdir()
    orphan, mine = out / "checkpoint.new.pth.k3x_9a2b.tmp", out / "notes.tmp"
    orphan.write_bytes(b"x" * 1000)
    mine.write_text("keep me")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(out), epochs=1)) == 0
    assert not orphan.exists() and mine.read_text() == "keep me"


# ---- a full disk: saves fail, training goes on, the run stops after N failures in a row --------------------
FSIZE_RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pretrain.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_keeps_previous_checkpoint_and_stops_after_n_failures(tmp_path, tiny_data, teacher_ckpt,
                                                                          monkeypatch):
    out = str(tmp_path / "run")
    argv = _stopped_run(tiny_data, teacher_ckpt, out, monkeypatch, pca_every_epochs=0)  # good checkpoint @2
    good = _sha(os.path.join(out, "checkpoint.pth"))
    limit = os.path.getsize(os.path.join(out, "checkpoint.pth")) // 2  # logs fit, a checkpoint does not
    run = subprocess.run([PYTHON, "-c", FSIZE_RUNNER, str(limit), *argv, "--max-save-failures", "3"], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=180)
    text = run.stdout + run.stderr
    assert run.returncode == EXIT_SAVE_FAILED, text[-3000:]
    assert "3 checkpoint writes in a row failed" in text and "Traceback" not in text
    assert text.count("training continues; the next save retries") == 2
    assert _sha(os.path.join(out, "checkpoint.pth")) == good  # the previous checkpoint is intact
    assert max(train_losses(out)) >= 6  # training went on past the first failed save (step 4)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


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


# ---- every knob is validated before any work ----------------------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    (dict(keep_checkpoints=0), "--keep-checkpoints must be in [1, inf]"),
    (dict(ema_decay=1.5), "--ema-decay must be in [0, 1)"),
    (dict(reprob=5), "--reprob must be in [0, 1]"),
    (dict(min_lr=1.0), "--min-lr 1.0 is above the peak learning rate"),
    (dict(weight_decay=-1), "--weight-decay must be in [0, inf]"),
    (dict(student_kwargs="depth=0"), "--student-kwargs values must be >= 1"),
    (dict(student_kwargs="depht=2"), "unknown key(s) ['depht']"),
    (dict(input_size=0), "--input-size must be in [1, inf]"),
    (dict(input_size=-14), "--input-size must be in [1, inf]"),
    (dict(log_every=0), "--log-every must be in [1, inf]"),
    (dict(lr_reference_batch=0), "--lr-reference-batch must be in [1, inf]"),
    (dict(lr=-0.5), "--lr must be in (0, inf]"),
    (dict(lr="nan"), "--lr must be a finite number"),
    (dict(num_workers=-1), "--num-workers must be in [0, inf]"),
    (dict(opt_betas=[0.9, 1.0]), "--opt-betas takes two values in [0, 1)"),
    (dict(aa="rand-m9-foo3"), "--aa 'rand-m9-foo3' is not a timm augmentation policy"),
    (dict(aa="autoaug"), "--aa 'autoaug' is not a timm augmentation policy"),
    (dict(aa="rand-zzz"), "--aa 'rand-zzz' is not a timm augmentation policy"),
    (dict(device="cuda"), "no GPU is visible"),
    (dict(teacher_checkpoint="missing.pth"), "--teacher-checkpoint"),
])
def test_bad_knobs_fail_before_any_work(overrides, needle, tmp_path, tiny_data, teacher_ckpt, capsys):
    out = tmp_path / "out"
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(out), **overrides)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("pretrain.main: error:") and "Traceback" not in err, err
    assert not out.exists()  # before the output dir, the teacher or the data loader


def test_every_numeric_knob_has_a_range():
    numeric = [k for k in config.expand(pretrain_main.KNOBS)
               if isinstance(k.default, (int, float)) and not isinstance(k.default, bool)]
    assert all(k.bounded for k in numeric), [k.name for k in numeric if not k.bounded]


def test_unwritable_output_dir_is_a_clear_error(tmp_path, tiny_data, teacher_ckpt, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(blocker / "run"))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "output dir" in err, err


def test_writing_into_another_tools_dir_is_refused(tmp_path, tiny_data, teacher_ckpt, capsys):
    out = tmp_path / "probe"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"tool": "linear_eval", "lr": 1}))
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(out))) == 2
    assert "linear_eval" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text()) == {"tool": "linear_eval", "lr": 1}


# ---- precision: auto picks bf16 only where it is native ----------------------------------------------------
@pytest.mark.parametrize("native,want", [("0", "fp32"), ("1", "bf16")])
def test_auto_precision_follows_the_cpu_and_is_recorded(native, want, tmp_path, tiny_data, teacher_ckpt,
                                                       monkeypatch):
    monkeypatch.setenv("PROTEUS_CPU_BF16", native)
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=1, precision="auto", pca_every_epochs=0)
    assert pretrain_main.main(argv) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["precision"] == want and cfg["precision_requested"] == "auto"
    assert f"precision {want} (auto:" in text_log(out)


def test_cpu_capability_decision_reads_the_flags(monkeypatch, tmp_path, caplog):
    from common import precision

    monkeypatch.delenv("PROTEUS_CPU_BF16", raising=False)
    avx2 = tmp_path / "cpuinfo_avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx = tmp_path / "cpuinfo_spr"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    real = precision.cpu_flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: real(str(avx2)))
    assert precision.resolve_precision("auto", "cpu")[0] == "fp32"
    assert "no native bf16" in precision.resolve_precision("auto", "cpu")[1]
    assert precision.resolve_precision("bf16", "cpu")[0] == "bf16" and "emulated" in caplog.text
    monkeypatch.setattr(precision, "cpu_flags", lambda: real(str(amx)))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert precision.resolve_precision("auto", "cpu") == ("bf16", "auto: CPU has native bf16 (avx512_bf16, amx_bf16)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below its bf16 kernels: emulated again
    assert precision.resolve_precision("auto", "cpu")[0] == "fp32"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in precision.resolve_precision("auto", "cpu")[1]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision.resolve_precision("auto", "cpu")[0] == "bf16"


def test_teacher_dtype_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    dt = config.teacher_weight_dtype
    assert dt({"teacher_dtype": "auto", "precision": "bf16"}, cpu) == torch.float32  # CPU: autocast casts
    assert dt({"teacher_dtype": "fp32", "precision": "bf16"}, cuda) == torch.float32  # the original
    assert dt({"teacher_dtype": "bf16", "precision": "fp32"}, cpu) == torch.bfloat16
    assert dt({"teacher_dtype": "auto", "precision": "fp32"}, cuda) == torch.float32
    assert dt({"teacher_dtype": "auto", "precision": "bf16"}, cuda) == torch.bfloat16
    assert dt({"teacher_dtype": "auto", "precision": "fp16"}, cuda) == torch.float16  # never bf16 under fp16


def test_logged_training_loss_is_the_mean_over_the_log_window(tmp_path, tiny_data, teacher_ckpt):
    per_step, windowed = str(tmp_path / "every"), str(tmp_path / "window")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, per_step, epochs=1, pca_every_epochs=0)) == 0
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, windowed, epochs=1, pca_every_epochs=0,
                                        log_every=3)) == 0
    steps, means = train_losses(per_step), train_losses(windowed)
    assert sorted(means) == [3, 6]
    assert means[3] == pytest.approx(sum(steps[s] for s in (1, 2, 3)) / 3, rel=1e-6)
    assert means[6] == pytest.approx(sum(steps[s] for s in (4, 5, 6)) / 3, rel=1e-6)



# ---- regressions found by a red-team pass ---------------------------------------------------------------------
def _copy(stopped_dir, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(stopped_dir, out)
    return out


def test_teacher_file_overwritten_in_place_is_a_different_teacher(tmp_path, tiny_data, teacher_ckpt, monkeypatch,
                                                                  capsys):
    import shutil

    import models

    teacher = str(tmp_path / "teacher.pth")  # a private copy: the same path will hold other weights
    shutil.copy(teacher_ckpt, teacher)
    out = str(tmp_path / "run")
    argv = _stopped_run(tiny_data, teacher, out, monkeypatch, pca_every_epochs=0)
    torch.manual_seed(5)
    torch.save(models.build_vit("vit_small", patch_size=14, img_size=518).state_dict(), teacher)
    capsys.readouterr()
    assert pretrain_main.main(argv) == 2
    err = capsys.readouterr().err
    assert "  teacher_fingerprint: checkpoint" in err and "--allow-resume-change teacher_checkpoint" in err, err
    assert pretrain_main.main(argv + ["--allow-resume-change", "teacher_checkpoint"]) == 0  # named: allowed


def test_shortening_epochs_below_what_was_trained_is_refused(tmp_path, tiny_data, teacher_ckpt, capsys):
    done = str(tmp_path / "done")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, done, epochs=2, pca_every_epochs=0)) == 0
    capsys.readouterr()
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, done, epochs=1, pca_every_epochs=0,
                                        allow_resume_change="epochs")) == 2
    assert "shorter than what" in capsys.readouterr().err


def test_no_usable_checkpoint_never_overwrites_a_finished_runs_exports(tmp_path, tiny_data, teacher_ckpt, capsys):
    out = str(tmp_path / "run")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0)) == 0
    for name in os.listdir(out):
        if name.startswith("checkpoint"):
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"garbage")
    export = _sha(os.path.join(out, "student_backbone.pth"))
    capsys.readouterr()
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0)) == 2
    assert "finished run's student_backbone.pth" in capsys.readouterr().err
    assert _sha(os.path.join(out, "student_backbone.pth")) == export
    os.remove(os.path.join(out, "student_backbone.pth"))
    os.remove(os.path.join(out, "student_backbone_ema.pth"))
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0)) == 0
    assert [n for n in os.listdir(out) if n.startswith("log.txt.previous-")]  # the old log set aside
    assert sorted(train_losses(out)) == list(range(1, 7))  # not steps 1..6 twice


@pytest.mark.parametrize("case", ["empty_class", "inside_data", "binary_list", "bare_tensor_teacher", "big_batch"])
def test_bad_data_and_files_are_user_errors(case, tmp_path, tiny_data, teacher_ckpt, capsys):
    import shutil

    data, teacher, out = tiny_data, teacher_ckpt, str(tmp_path / "out")
    if case == "empty_class":
        data = str(tmp_path / "data")
        shutil.copytree(tiny_data, data)
        os.makedirs(os.path.join(data, "n_empty"))
        (tmp_path / "data" / "n_empty" / "readme.txt").write_text("no images here")
    elif case == "inside_data":
        data = str(tmp_path / "data")
        shutil.copytree(tiny_data, data)
        out = os.path.join(data, "run")
    elif case == "binary_list":
        data = str(tmp_path / "list.txt")
        with open(data, "wb") as f:
            f.write(bytes(range(256)) * 4)
    elif case == "bare_tensor_teacher":
        teacher = str(tmp_path / "tensor.pth")
        torch.save(torch.zeros(3), teacher)
    code = pretrain_main.main(tiny_args(data, teacher, out, epochs=1, batch_size=32 if case == "big_batch" else 4))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pretrain.main: error:") and "Traceback" not in err, err
    needle = {"empty_class": "n_empty", "inside_data": "inside --data-path", "binary_list": "not a text file",
              "bare_tensor_teacher": "not a state dict", "big_batch": "less than one batch of 32"}[case]
    assert needle in err, err
