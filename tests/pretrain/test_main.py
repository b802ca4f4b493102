"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""

import glob
import json
import os
import subprocess

import pytest
import torch

import models
from common.errors import EXIT_USER_ERROR
from pretrain import config
from pretrain import main as pretrain_main
from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, teacher_ckpt, text_log,  # noqa: F401
                                    tiny_args, tiny_data, train_losses, write_image_folder)
from tests.pretrain.helpers_hostile_inputs import one_message, run  # noqa: F401


@pytest.mark.slow
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
@pytest.mark.slow
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

os.environ["HF_HUB_OFFLINE"] = "1"


REQUIRED_FLAGS = ["--data-path", "--output-dir", "--teacher", "--teacher-checkpoint", "--student", "--patch-size",
                  "--input-size", "--batch-size", "--epochs", "--lr", "--device", "--num-workers", "--seed",
                  "--precision", "--mask-probability", "--mask-ratio", "--lambda-token", "--lambda-fea",
                  "--lambda-patch", "--on-bad-image", "--save-every-steps"]


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in REQUIRED_FLAGS:
        assert flag in text, flag
    for knob in config.expand(pretrain_main.KNOBS):  # every row of the knob table is a flag
        assert knob.flag in text, knob.name
    assert "dinov2_vitb14" in text and "0.99996" in text  # defaults are shown


def test_defaults_are_the_paper_recipe():
    cfg = pretrain_main.parse_config([])
    assert (cfg["student"], cfg["patch_size"], cfg["teacher"]) == ("vit_small", 14, "dinov2_vitb14")
    assert (cfg["epochs"], cfg["warmup_epochs"], cfg["lr"], cfg["weight_decay"]) == (300, 5, 5e-4, 0.05)
    assert (cfg["mask_probability"], cfg["mask_ratio"], cfg["ema_decay"]) == (0.5, [0.5], 0.99996)
    assert cfg["lambda_token"] == cfg["lambda_fea"] == cfg["lambda_patch"] == 1.0


def test_the_resolved_config_is_frozen():
    from common.dist import DistInfo

    cfg = config.derive(pretrain_main.parse_config(["--global-batch-size", "256"]),
                        DistInfo(0, 2, 0, torch.device("cpu")))
    assert (cfg["batch_size"], cfg["global_batch"], cfg["tool"]) == (128, 256, "pretrain")
    with pytest.raises(TypeError):  # builders return values; none writes into the configuration
        cfg["batch_size"] = 1


@pytest.mark.slow
def test_overrides_config_json_and_exports(tmp_path, tiny_data, teacher_ckpt):
    import timm

    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=1, mask_ratio=[0.2, 0.6], lambda_fea=0.5, seed=3)
    assert pretrain_main.main(argv) == 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["mask_ratio"] == [0.2, 0.6] and cfg["lambda_fea"] == 0.5 and cfg["seed"] == 3
    assert cfg["lr_scaled"] == pytest.approx(0.05 * 4 / 512) and cfg["steps_per_epoch"] == 6
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert not any("teacher" in k for k in ckpt) and ckpt["global_step"] == 6
    # exports and checkpoint keys are what models.load_backbone reads (it builds full-size archs, so the tiny
    # student is built here with the same overrides), and timm's DINOv2 ViT loads them (the README one-liner)
    student = models.build_student("vit_tiny", 14, 56, depth=2, embed_dim=64, num_heads=2)
    for path, ema in (("student_backbone.pth", False), ("checkpoint.pth", False), ("checkpoint.pth", True)):
        sd = models.backbone_state_dict(models.read_checkpoint(os.path.join(out, path)), ema=ema)
        models.load_state_dict_checked(student, sd, what=path)
    ema_path = os.path.join(out, "student_backbone_ema.pth")
    student.load_state_dict(torch.load(ema_path, weights_only=True))
    tm = timm.create_model("vit_small_patch14_dinov2", pretrained=True, img_size=56, embed_dim=64, depth=2,
                           num_heads=2, pretrained_cfg_overlay=dict(file=ema_path))
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(tm.eval().forward_features(x)[:, 0], student.eval().forward_features(x)["cls"],
                               rtol=1e-4, atol=1e-4)
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))


@pytest.mark.parametrize("overrides,needle", [
    (dict(patch_size=15), "--patch-size 15 does not divide --input-size 56"),
    (dict(teacher="synclr_vitb16", input_size=56), "--input-size 56 is not a multiple of teacher synclr_vitb16's patch size 16"),
    (dict(mask_ratio=[1.5]), "--mask-ratio must lie in [0, 1]"),
    (dict(crop_scale=[0.5, 0.2]), "--crop-scale takes LO HI with 0 < LO <= HI <= 1"),
    (dict(teacher="dinov3_vitx16"), "unknown teacher 'dinov3_vitx16'"),
    (dict(student="vit_huge"), "unknown student 'vit_huge'"),
    (dict(global_batch_size=5), "--global-batch-size 5 is not divisible by the 2 processes"),
    (dict(data_path="EMPTY"), "has no class sub-folders"),
])
def test_bad_configuration_is_named(overrides, needle, tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # only read by validation, which fails before distributed set-up
    if overrides.get("data_path") == "EMPTY":
        overrides["data_path"] = str(tmp_path)
    argv = tiny_args(tiny_data, "unused.pth", str(tmp_path / "out"), **overrides)
    assert pretrain_main.main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert needle in err, err
    assert not os.path.exists(tmp_path / "out")  # nothing heavy started


@pytest.mark.slow
def test_torchrun_two_processes_trains_stops_and_continues(tmp_path, tiny_data, teacher_ckpt):
    """2 ranks on gloo: a SIGTERM after step 4 stops at step 6 with a checkpoint; the same command continues."""
    out = str(tmp_path / "ddp")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
           "pretrain.main", *tiny_args(tiny_data, teacher_ckpt, out, epochs=3, warmup_epochs=0, lr=0.2)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    faulty = [*cmd[:cmd.index("-m", 3)], FAULTY_PRETRAIN, "--signal-at-step", "4", "--",
              *cmd[cmd.index("pretrain.main") + 1:]]
    first = subprocess.run(faulty, cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=240)
    assert first.returncode != 0, first.stdout[-3000:]  # the ranks exit 75 (preempted)
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["global_step"] == 6 and len(ckpt["rng"]) == 2, first.stdout[-3000:] + first.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "student_backbone.pth"))
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in text_log(out) and "step 6" in text_log(out)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 10))  # steps 1-6 from the first run, 7-9 from the second
    assert losses[9] < losses[1] and sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])
    for name in ("checkpoint.pth", "student_backbone.pth", "student_backbone_ema.pth", "log.txt", "config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["global_step"] == 9


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_single_image_runs_the_same_output_checks_as_every_data_mode(tmp_path, tiny_data, teacher_ckpt):
    out = tmp_path / "run"
    out.mkdir()
    (out / "vit_tiny-2").write_text("a file where the second student exports")
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, str(out), student="vit_tiny,vit_tiny",
                                                single_image=os.path.join(tiny_data, "n00000000", "0.JPEG")))
    one_message(rc, err, "vit_tiny-2 is a file")
    assert sorted(os.listdir(out)) == ["vit_tiny-2"]  # refused before any work


@pytest.mark.slow
def test_each_student_records_its_own_scaled_lr(tmp_path, tiny_data, teacher_ckpt):
    out = tmp_path / "run"
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, str(out), epochs=1, pca_every_epochs=0,
                                                student="vit_tiny,vit_tiny", student_lr="0.01,0.2",
                                                lr_reference_batch=4))  # batch 4: lr_scaled == lr
    assert rc == 0, err[-3000:]
    own = {k: json.load(open(out / k / "config.json"))["lr_scaled"] for k in ("vit_tiny", "vit_tiny-2")}
    assert own == {"vit_tiny": pytest.approx(0.01), "vit_tiny-2": pytest.approx(0.2)}


@pytest.mark.slow
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


@pytest.mark.slow
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
