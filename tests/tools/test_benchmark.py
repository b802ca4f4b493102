"""tools.benchmark: --precision auto (choice and reason in the JSON), --json into a new folder, nonsense
settings as one-line user errors (exit 2, no traceback, before any timing), the ablation table."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--teacher", "dinov2_vits14", "--student", "vit_tiny", "--student-kwargs", "depth=1,embed_dim=32,num_heads=2",
        "--batch-size", "2", "--input-size", "28", "--device", "cpu", "--steps", "1", "--warmup", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def with_flag(flag: str, value: str) -> list[str]:
    """TINY with `flag` set to `value` (replaced if TINY has it)."""
    argv = list(TINY)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


def test_json_into_a_missing_folder_is_created_with_the_resolved_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEUS_CPU_BF16", "0")  # a CPU without native bf16: auto must pick fp32
    out = tmp_path / "not" / "yet" / "bench.json"
    assert benchmark.main(TINY + ["--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["precision"] == "fp32" and "PROTEUS_CPU_BF16=0" in summary["precision_reason"]
    assert summary["config"]["precision"] == "auto" and summary["cpu_native_bf16"] is False
    row = summary["results"][0]
    assert row["precision"] == "fp32" and row["img_per_s"] > 0 and row["tflop_per_step"] > 0
    assert row["ms_step"] == pytest.approx(row["ms_teacher"] + row["ms_student"] + row["ms_optimizer"])
    assert row["cpu_ms_step"] > 0 and summary["threads"] == 1  # the one_thread fixture's setting


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROTEUS_CPU_BF16", "1")
    out = tmp_path / "bench.json"
    assert benchmark.main(TINY + ["--threads", "2", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["threads"] == 2 and summary["config"]["threads"] == 2
    assert summary["precision"] == "bf16" and summary["results"][0]["precision"] == "bf16"
    assert "precision bf16 (auto: PROTEUS_CPU_BF16=1)" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--steps", "-2"), ("--batch-size", "0"),
                                        ("--batch-size", "-4"), ("--warmup", "-1"), ("--input-size", "0"),
                                        ("--input-size", "30"), ("--mask-probability", "1.5"), ("--threads", "-1"),
                                        ("--student", "vit_huge"), ("--teacher", "dinov9"),
                                        ("--student-kwargs", "depth=0"), ("--patch-size", "16"),
                                        ("--teacher-checkpoint", "/no/such/teacher.pth")])
def test_nonsense_settings_are_one_line_user_errors(flag, value, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(with_flag(flag, value) + ["--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tools.benchmark: error: ")
    assert not out.exists()


def test_cuda_without_a_gpu_is_a_user_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert benchmark.main(with_flag("--device", "cuda")) == 2
    assert "no GPU is visible" in capsys.readouterr().err


def test_an_unusable_json_path_fails_before_any_timing(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert benchmark.main(TINY + ["--json", str(blocker / "bench.json")]) == 2  # its folder would be a file
    assert "cannot create its folder" in capsys.readouterr().err
    assert benchmark.main(TINY + ["--json", str(tmp_path)]) == 2  # a folder, not a file name
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_exit_code_and_no_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--steps", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tools.benchmark: error: --steps must be >= 1, got 0"


def test_ablations_add_one_speed_up_then_take_one_away_under_reduced_precision():
    a = benchmark.parse_args(TINY + ["--ablations"])
    bf16 = benchmark.variants(a, "bf16", torch.device("cpu"))
    names = [v["name"] for v in bf16]
    assert names[:5] == ["original-like: fp32, no SDPA, 2 passes, foreach AdamW", "+ SDPA", "+ one student pass",
                         "+ bf16 autocast", "+ fused AdamW"]
    default = bf16[4]
    assert default["headline"] and [v["name"] for v in bf16 if v["headline"]] == ["+ fused AdamW"]
    assert (default["precision"], default["sdpa"], default["two_pass"], default["fused_adamw"]) == \
        ("bf16", True, False, "on")
    changed = [{k for k in v if v[k] != default[k]} - {"name", "headline"} for v in bf16[5:]]
    assert changed == [{"sdpa"}, {"two_pass"}, {"teacher_autocast", "teacher_dtype"}]  # one thing each
    fp32 = benchmark.variants(a, "fp32", torch.device("cpu"))
    assert [v["name"] for v in fp32] == ["original-like: fp32, no SDPA, 2 passes, foreach AdamW", "+ SDPA",
                                         "+ one student pass", "+ fused AdamW"]  # no no-op autocast row
    assert len(benchmark.variants(benchmark.parse_args(TINY), "bf16", torch.device("cpu"))) == 1


def test_teacher_outside_autocast_gives_exact_fp32_targets(tmp_path):
    a = benchmark.parse_args(TINY)
    teacher = benchmark.random_teacher(a.teacher, "", a.input_size, str(tmp_path))
    x = torch.randn(2, 3, 28, 28)
    exact = teacher(x)["patch"]
    errors = []
    for autocast in (True, False):
        v = dict(benchmark.variants(a, "bf16", torch.device("cpu"))[0], teacher_autocast=autocast)
        benchmark.prepare_teacher(teacher, v, torch.device("cpu"))
        tr = benchmark.build_trainer(a, v, teacher, torch.device("cpu"))
        errors.append(float((tr.teacher_targets(x)[a.teacher]["patch"] - exact).abs().max()))
    assert errors[0] > 1e-3 and errors[1] == 0.0  # bf16 matmuls under autocast; outside it, fp32 bit for bit


def test_measured_cpu_peak_is_cached_per_dtype():
    first = benchmark.matmul_peak(torch.device("cpu"), "fp32")
    assert first[0] > 0 and "best of a@b, a@b^T, a^T@b" in first[1]
    assert benchmark.matmul_peak(torch.device("cpu"), "fp32") is first


def test_cpu_mfu_uses_the_best_peak_of_before_and_after_the_rows(monkeypatch):
    """A peak measured while another process held a core is low; the re-measured one after the rows wins."""
    cpu = torch.device("cpu")
    monkeypatch.setitem(benchmark._PEAKS, ("cpu", "fp32"), (1e9, "low, under load"))
    monkeypatch.setattr(benchmark, "measured_matmul_peak", lambda device, precision: (4e9, "quiet"))
    rows = [{"precision": "fp32", "tflops_per_s": 0.002, "mfu": 2.0}]  # 2 GFLOP/s against the low 1 GFLOP/s: 200 %
    (row,) = benchmark.best_peak(rows, cpu)
    assert row["mfu"] == pytest.approx(0.5) and row["peak_tflops"] == pytest.approx(0.004)
    assert row["peak_source"].startswith("quiet")
    monkeypatch.setattr(benchmark, "measured_matmul_peak", lambda device, precision: (1e8, "busy"))
    (row,) = benchmark.best_peak(rows, cpu)  # a lower re-measurement never replaces a higher peak
    assert row["mfu"] == pytest.approx(0.5)


def test_several_students_time_one_teacher_pass_against_their_separate_steps(tmp_path):
    out = tmp_path / "joint.json"
    argv = with_flag("--student-kwargs", "depth=1,embed_dim=32,num_heads=2;depth=2,embed_dim=48,num_heads=2")
    argv[argv.index("--student") + 1] = "vit_tiny,vit_small"
    assert benchmark.main(argv + ["--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["students"] == ["vit_tiny", "vit_small"]
    rows = r["rows"]
    assert [row["step"] for row in rows] == ["joint", "separate vit_tiny", "separate vit_small"]
    joint = rows[0]
    parts = joint["ms_teacher"] + joint["ms_student:vit_tiny"] + joint["ms_student:vit_small"] + joint["ms_optimizer"]
    assert joint["ms_step"] == pytest.approx(parts)
    assert "ms_student:vit_small" not in rows[1] and "ms_student:vit_tiny" in rows[1]
    assert r["ratio"] == pytest.approx(joint["ms_step"] / (rows[1]["ms_step"] + rows[2]["ms_step"]))
    assert r["data_cpu_ms_per_batch"] > 0 and 0 < r["ratio_with_data"]
    mem = joint["memory_mib"]  # per student: its parameters, grads, AdamW moments and EMA
    assert set(mem) == {"vit_tiny", "vit_small"} and mem["vit_small"]["params"] > mem["vit_tiny"]["params"]
    assert mem["vit_tiny"]["adamw"] == pytest.approx(2 * mem["vit_tiny"]["grads"])


def test_ablations_take_one_student(capsys):
    argv = with_flag("--student", "vit_tiny,vit_small") + ["--student-kwargs", "depth=1,embed_dim=32,num_heads=2",
                                                           "--ablations"]
    assert benchmark.main(argv) == 2
    assert "--ablations / --ablate-compile time one student" in capsys.readouterr().err
