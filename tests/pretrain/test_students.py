"""Issue #13: one teacher pass, several students (pretrain/students.py).

The central claim: a joint run trains each student exactly as its own run would (same weights at the end,
bitwise, on CPU fp32 with --num-workers 0), because students share only the batch, the masks and the
teacher targets; each has its own init stream, stochastic-depth stream, AdamW, schedule and EMA.
"""
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

import models
from pretrain import main as pretrain_main
from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, teacher_ckpt, text_log,  # noqa: F401
                                    tiny_args, tiny_data, train_losses)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_KW = "depth=2,embed_dim=64,num_heads=2"
SMALL_KW = "depth=1,embed_dim=32,num_heads=2"
FILES = ("student_backbone.pth", "student_backbone_ema.pth")


def joint_args(data, teacher, out, **kw):
    # different sizes, one with stochastic depth, one with its own lr: everything that is per student
    base = dict(student="vit_tiny,vit_small", student_kwargs=f"{TINY_KW};{SMALL_KW}", student_drop_path="0.1,0",
                student_lr="0.05,0.02", pca_every_epochs=0, epochs=2)
    return tiny_args(data, teacher, out, **{**base, **kw})


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a: dict, b: dict, what: str):
    assert set(a) == set(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, tiny_data, teacher_ckpt) -> str:
    # one thread, as the one_thread fixture gives the runs it is compared with (a module fixture is set up
    # before any function fixture): CPU reductions split over threads round differently
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = str(tmp_path_factory.mktemp("joint") / "run")
        assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out)) == 0
    finally:
        torch.set_num_threads(before)
    return out


def test_joint_run_equals_separate_runs_bitwise(joint_run, tmp_path, tiny_data, teacher_ckpt):
    separate = {"vit_tiny": dict(student="vit_tiny", student_kwargs=TINY_KW, drop_path=0.1, lr=0.05),
                "vit_small": dict(student="vit_small", student_kwargs=SMALL_KW, lr=0.02)}
    joint_log = read_log(joint_run)
    for key, flags in separate.items():
        out = str(tmp_path / key)
        assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, pca_every_epochs=0, epochs=2, **flags)) == 0
        for name in FILES:  # final weights and EMA, bitwise
            assert_same_state(load(os.path.join(joint_run, key, name)), load(os.path.join(out, name)), f"{key}/{name}")
        own = {r["step"]: r["train/loss"] for r in read_log(out) if "train/loss" in r}
        theirs = {r["step"]: r[f"train/{key}/loss"] for r in joint_log if f"train/{key}/loss" in r}
        assert own == theirs and len(own) == 12  # 24 images / batch 4 x 2 epochs, every step logged
        lrs = {r["step"]: r["train/lr"] for r in read_log(out) if "train/lr" in r}
        assert lrs == {r["step"]: r[f"train/{key}/lr"] for r in joint_log if f"train/{key}/lr" in r}
    # the two students really differ (own sizes and schedules), and the layout is one folder per student
    cfg = json.load(open(os.path.join(joint_run, "config.json")))
    assert [s["key"] for s in cfg["students"]] == ["vit_tiny", "vit_small"]
    assert [s["lr_scaled"] for s in cfg["students"]] == pytest.approx([0.05 * 4 / 512, 0.02 * 4 / 512])
    assert not os.path.exists(os.path.join(joint_run, "student_backbone.pth"))
    ckpt = load(os.path.join(joint_run, "checkpoint.pth"))
    assert list(ckpt["students"]) == ["vit_tiny", "vit_small"] and "student" not in ckpt
    assert "holds" in text_log(joint_run) and "MiB" in text_log(joint_run)  # memory per student is reported


def test_each_students_export_loads_by_itself(joint_run):
    for key, kw in (("vit_tiny", TINY_KW), ("vit_small", SMALL_KW)):
        folder = os.path.join(joint_run, key)
        view = json.load(open(os.path.join(folder, "config.json")))
        assert (view["student"], view["student_kwargs"], view["tool"]) == (key, kw, "pretrain")
        from tools.export import read_source

        src = read_source(os.path.join(folder, "student_backbone.pth"))  # arch and sizes from the config beside it
        net = models.build_student(src.arch, src.patch_size, src.img_size, **src.kwargs)
        net.load_state_dict(src.state_dict)
    from models.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds 2 students"):
        models.load_backbone(os.path.join(joint_run, "checkpoint.pth"), "vit_tiny", patch_size=14)


@pytest.mark.slow
def test_joint_kill9_and_resume_is_exact(joint_run, tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "killed")
    argv = joint_args(tiny_data, teacher_ckpt, out)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "8", "--", *argv], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                 "OMP_NUM_THREADS": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert load(os.path.join(out, "checkpoint.pth"))["global_step"] == 8  # save_every_steps=2
    assert pretrain_main.main(argv) == 0
    for key in ("vit_tiny", "vit_small"):
        for name in FILES:
            assert_same_state(load(os.path.join(joint_run, key, name)), load(os.path.join(out, key, name)),
                              f"{key}/{name}")
    assert train_losses(out) == train_losses(joint_run)


def test_dropping_and_adding_students_needs_the_flag_and_loses_nothing(tmp_path, tiny_data, teacher_ckpt, capsys):
    out = str(tmp_path / "run")
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, epochs=1)) == 0
    ckpt = load(os.path.join(out, "checkpoint.pth"))
    one = dict(student="vit_tiny", student_kwargs=TINY_KW, student_drop_path="0.1", student_lr="0.05", epochs=2)
    capsys.readouterr()
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, **one)) == 2
    err = capsys.readouterr().err
    assert "student: checkpoint" in err and "--allow-resume-change" in err and "student" in err.split("--allow")[-1]
    assert load(os.path.join(out, "checkpoint.pth"))["global_step"] == ckpt["global_step"]  # nothing touched

    # a changed size of a kept student is refused even with the flag: it would be another student
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, student_kwargs=f"{TINY_KW};depth=3",
                                         epochs=2, allow_resume_change="student,epochs")) == 2
    assert "student_kwargs" in capsys.readouterr().err

    # drop vit_small: its weights at the checkpoint are exported, vit_tiny continues in the one-student layout
    os.remove(os.path.join(out, "vit_small", "student_backbone.pth"))  # the finished 1-epoch export
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, **one,
                                         allow_resume_change="student,epochs")) == 0
    assert_same_state(load(os.path.join(out, "vit_small", "student_backbone.pth")),
                      ckpt["students"]["vit_small"]["student"], "dropped vit_small")
    final = load(os.path.join(out, "checkpoint.pth"))
    assert "students" not in final and final["global_step"] == 12
    assert os.path.exists(os.path.join(out, "student_backbone.pth"))
    changes = json.load(open(os.path.join(out, "config.json")))["resume_changes"]
    assert changes[-1]["step"] == 6 and "student" in changes[-1]["changes"]

    # adding a student at the last step would export an untrained one: refused until the run is extended
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, epochs=2,
                                         allow_resume_change="student,epochs")) == 2
    assert "would join" in capsys.readouterr().err
    dropped = load(os.path.join(out, "vit_small", "student_backbone.pth"))
    one_export = load(os.path.join(out, "student_backbone.pth"))

    # add a student to the finished one-student run: it joins at step 12 with its own warm-up
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, epochs=3,
                                         allow_resume_change="student,epochs")) == 0
    # nothing was overwritten: the dropped student's export and the one-student export are kept aside
    aside = sorted(os.listdir(out))
    kept_small = [n for n in aside if n.startswith("vit_small.before-step12-")]
    kept_top = [n for n in aside if n.startswith("student_backbone.pth.before-step12-")]
    assert len(kept_small) == 1 and len(kept_top) == 1, aside
    assert_same_state(load(os.path.join(out, kept_small[0], "student_backbone.pth")), dropped, "dropped export")
    assert_same_state(load(os.path.join(out, kept_top[0])), one_export, "one-student export")
    final = load(os.path.join(out, "checkpoint.pth"))
    assert final["students"]["vit_small"]["start_step"] == 12 and final["students"]["vit_tiny"]["start_step"] == 0
    lrs = {r["step"]: r["train/vit_small/lr"] for r in read_log(out) if "train/vit_small/lr" in r}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6, 13, 14, 15, 16, 17, 18]  # trained, dropped for 7-12, back again
    assert lrs[13] == pytest.approx(1e-6) and lrs[14] > lrs[13]  # step 0 of its own warm-up: --warmup-lr
    assert "joins at step 12" in text_log(out)


@pytest.mark.parametrize("overrides,needle", [
    (dict(student_kwargs=f"{TINY_KW};{SMALL_KW};depth=1"), "--student-kwargs has 3 entries for 2 students"),
    (dict(student_lr="0.1,x"), "--student-lr takes numbers"),
    (dict(student_drop_path="0.1,1.5"), "--student-drop-path must be in [0, 1)"),
    (dict(student="vit_tiny,,vit_small"), "comma-separated names"),
    (dict(student="vit_tiny,vit_huge"), "unknown student 'vit_huge'"),
    (dict(student_lr="1e-9,0.05", min_lr=1e-5), "above the peak learning rate"),
    (dict(student="vit_tiny,timm:resnet18"), "student timm-resnet18: --student-kwargs"),  # ViT sizes for a ResNet
    (dict(student_kwargs=f"{TINY_KW};depth=1,embed_dim=30,num_heads=4"), "student vit_small: --student-kwargs"),
])
def test_bad_student_lists_are_one_line_errors(overrides, needle, tmp_path, tiny_data, teacher_ckpt, capsys):
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, str(tmp_path / "o"), **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "o")


def test_a_file_where_a_student_exports_is_refused_before_training(tmp_path, tiny_data, teacher_ckpt, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "vit_small").write_text("not a folder")
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, str(out))) == 2
    assert "student vit_small exports into that folder" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["vit_small"]  # nothing written


def test_a_checkpoint_with_untrusted_student_keys_is_set_aside(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, epochs=1)) == 0
    ckpt = load(os.path.join(out, "checkpoint.pth"))
    students = ckpt["students"]
    ckpt["students"] = {"../escaped": students["vit_tiny"], "vit_small": students["vit_small"]}
    torch.save(ckpt, os.path.join(out, "checkpoint.pth"))  # a path as a key: it would export outside OUTPUT
    for name in os.listdir(out):
        if name.startswith("checkpoint.") and name != "checkpoint.pth":
            os.remove(os.path.join(out, name))  # no older checkpoint to fall back to
    shutil.rmtree(os.path.join(out, "vit_tiny")), shutil.rmtree(os.path.join(out, "vit_small"))
    assert pretrain_main.main(joint_args(tiny_data, teacher_ckpt, out, epochs=1)) == 0  # from scratch
    assert any(n.startswith("checkpoint.pth.unreadable-") for n in os.listdir(out))
    assert not os.path.exists(tmp_path / "escaped")
    assert "not plain folder names" in text_log(out)


def test_one_students_lr_override_is_the_runs_recorded_lr(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "one")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, student_lr="0.1", epochs=1,
                                        pca_every_epochs=0)) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["lr_scaled"] == pytest.approx(0.1 * 4 / 512) == cfg["students"][0]["lr_scaled"]


@pytest.mark.slow
def test_repeated_architectures_get_their_own_keys(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "twice")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, student="vit_tiny,vit_tiny,timm:resnet18",
                                        student_kwargs=f"{TINY_KW};{SMALL_KW};", epochs=1, pca_every_epochs=1)) == 0
    keys = [s["key"] for s in json.load(open(os.path.join(out, "config.json")))["students"]]
    assert keys == ["vit_tiny", "vit_tiny-2", "timm-resnet18"]
    for k in keys:
        assert os.path.isfile(os.path.join(out, k, "student_backbone.pth")), k
    a, b = (load(os.path.join(out, k, "student_backbone.pth")) for k in keys[:2])
    assert a["pos_embed"].shape[-1] == 64 and b["pos_embed"].shape[-1] == 32
    import timm

    net = timm.create_model("resnet18", num_classes=0)
    net.load_state_dict(load(os.path.join(out, "timm-resnet18", "student_backbone.pth")))


@pytest.mark.slow
def test_two_process_torchrun_trains_every_student(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "ddp")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "pretrain.main", *joint_args(tiny_data, teacher_ckpt, out, epochs=1)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = load(os.path.join(out, "checkpoint.pth"))
    assert len(ckpt["rng"]) == 2 and list(ckpt["students"]) == ["vit_tiny", "vit_small"]
    rows = [r for r in read_log(out) if "train/vit_small/loss" in r]
    assert len(rows) == 3 and all(r["train/vit_tiny/loss"] > 0 for r in rows)
