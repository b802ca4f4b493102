"""pretrain.main end to end on CPU: --help, overrides + config.json, exports, bad configs, 2-process torchrun."""
import glob
import json
import os
import subprocess

import pytest
import torch

import models
from pretrain import config
from pretrain import main as pretrain_main
from test_pretrain_fixtures import FAULTY_PRETRAIN, REPO, PYTHON, read_log, teacher_ckpt, text_log, tiny_args, tiny_data, train_losses  # noqa: F401

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


def test_student_kwargs_accept_pairs_or_the_evals_json():
    want = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    assert config.parse_student_kwargs("depth=2, embed_dim=64,num_heads=2") == want
    assert config.parse_student_kwargs(json.dumps(want)) == want
    assert config.parse_student_kwargs("") == {}
    with pytest.raises(ValueError, match="key=int pairs"):
        config.parse_student_kwargs("depth=two")
    with pytest.raises(ValueError, match="not valid JSON"):
        config.parse_student_kwargs("{depth: 2}")
    with pytest.raises(ValueError, match="must be integers"):
        config.parse_student_kwargs('{"depth": 2.5}')


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
    assert pretrain_main.main(argv) == pretrain_main.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert needle in err, err
    assert not os.path.exists(tmp_path / "out")  # nothing heavy started


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
