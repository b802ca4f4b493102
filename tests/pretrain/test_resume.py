"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""

import json
import os
import subprocess

import pytest
import torch

from pretrain import main as pretrain_main
from tests.pretrain.helpers import (PYTHON, REPO, _ckpt, _sha, _stopped_run, read_log, teacher_ckpt,  # noqa: F401
                                    text_log, tiny_args, tiny_data, train_losses, write_image_folder)
from tests.pretrain.helpers_hostile_inputs import run  # noqa: F401


# ---- one run per output dir ------------------------------------------------------------------------------
def test_pretrain_holds_its_output_dir_with_the_common_run_dir_lock(tmp_path, tiny_data, teacher_ckpt, monkeypatch):
    """common.rundir's lock, like every tool's: held while training (a second run is refused, see
    tests/pretrain/test_main.py), released by the cli boundary when the run returns."""
    from common import rundir
    from common.runlock import RunDirBusy, RunDirLock

    out = str(tmp_path / "run")
    seen = {}

    def train(cfg, info):
        seen["held"] = cfg["output_dir"] in rundir._HELD
        with pytest.raises(RunDirBusy, match=f"PID {os.getpid()}"):
            RunDirLock(cfg["output_dir"]).acquire()
        return 0

    monkeypatch.setattr(pretrain_main, "train", train)
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out)) == 0
    assert seen == {"held": True} and out not in rundir._HELD
    RunDirLock(out).acquire().release()  # free again


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_changed_data_path_is_refused(tmp_path, tiny_data, teacher_ckpt, stopped_dir, capsys):
    import shutil

    from tests.pretrain.helpers import write_image_folder

    out = str(tmp_path / "run")
    shutil.copytree(stopped_dir, out)
    other = write_image_folder(tmp_path / "other", seed=1)
    assert pretrain_main.main(tiny_args(other, teacher_ckpt, out)) == 2
    assert "  data_path: checkpoint" in capsys.readouterr().err


@pytest.mark.slow
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


@pytest.mark.slow
def test_allow_resume_change_rejects_keys_that_cannot_change(tmp_path, tiny_data, teacher_ckpt, capsys):
    argv = tiny_args(tiny_data, teacher_ckpt, str(tmp_path / "run"), allow_resume_change="seed")
    assert pretrain_main.main(argv) == 2
    assert "cannot change on resume" in capsys.readouterr().err


# ---- foreign and unreadable checkpoints are set aside, never deleted ----------------------------------------
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
