"""scripts/gpu_check.sh: exits 0 at once without a GPU; its GPU path runs end to end as a CPU dry run and
writes one JSON report; a hanging or failing check is recorded, never fatal; the budget skips what is left."""
import json
import os
import subprocess
import sys
import time

import pytest

from tools import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
EXPECTED = ["inputs", "pretrain_bf16", "pretrain_fp16", "resume_signal", "resume_continue", "pretrain_gpu_data",
            "linear_eval",
            "fine_grained", "bench_vit_tiny_dinov2_vits14_eager", "bench_vit_tiny_dinov2_vits14_compile",
            "bench_joint_vit_tiny+vit_small_dinov2_vits14", "data"]


@pytest.mark.slow
def test_without_a_gpu_the_script_exits_zero_at_once(tmp_path):
    out = tmp_path / "report.json"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU is visible" in proc.stdout
    assert not out.exists() and time.monotonic() - t0 < 5  # nothing ran, not even `import torch`


def test_without_a_gpu_the_module_says_so_and_exits_zero(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "report.json")]) == 0  # CUDA is hidden in the tests
    assert "no CUDA GPU is visible" in capsys.readouterr().out and not (tmp_path / "report.json").exists()


def test_cpu_without_dry_run_is_a_user_error(capsys):
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "--dry-run only" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "sub" / "report.json"  # its folder does not exist yet
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--dry-run", "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=580)
    return proc, out


@pytest.mark.slow
def test_dry_run_passes_every_check_and_writes_one_report(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {out}" in proc.stdout
    report = json.loads(out.read_text())
    assert report["tool"] == "tools.gpu_check" and report["dry_run"] is True and report["device"] == "cpu"
    assert {"torch", "device_name", "cpu_native_bf16"} <= set(report["env"])
    checks = report["checks"]
    assert [c["name"] for c in checks] == EXPECTED
    for c in checks:
        assert {"name", "status", "error", "seconds", "metrics"} <= set(c)
        assert isinstance(c["seconds"], float)
    statuses = {c["name"]: c["status"] for c in checks}
    assert all(s == "ok" for n, s in statuses.items() if not n.endswith("_compile")), statuses
    assert all(c["error"] is None for c in checks if c["status"] == "ok")
    assert [c["error"] for c in checks if c["name"].endswith("_compile")] == \
        ["skipped: torch.compile is not timed in a dry run"]
    assert report["summary"] == {"ok": 11, "failed": 0, "skipped": 1}


@pytest.mark.slow
def test_dry_run_records_what_each_check_measured(dry_run):
    _, out = dry_run
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    steps = gpu_check.steps_of(gpu_check.dry_sizes())
    for name, precision in (("pretrain_bf16", "bf16"), ("pretrain_fp16", "fp16"), ("resume_continue", "bf16")):
        m = checks[name]["metrics"]
        assert m["precision"] == precision and m["steps"] == steps and m["last_loss"] > 0
    assert 2 <= checks["resume_signal"]["metrics"]["stopped_at_step"] < steps
    gpu_data = checks["pretrain_gpu_data"]["metrics"]  # --data-pipeline gpu, one epoch (on CPU tensors here)
    assert gpu_data["steps"] == steps // gpu_check.dry_sizes().pretrain_epochs and gpu_data["last_loss"] > 0
    assert 0 <= checks["linear_eval"]["metrics"]["top1"] <= 100
    assert 0 <= checks["fine_grained"]["metrics"]["test_score"] <= 100
    data = checks["data"]["metrics"]  # the loader row: img/s per core, cores per GPU for the measured step
    assert all(v > 0 for v in data["img_per_cpu_s"].values())
    assert set(data["cores_per_gpu_for_measured_steps"]) == {"vit_tiny_dinov2_vits14"}
    bench = json.loads(out.read_text())["benchmarks"]
    assert len(bench) == 2
    joint = bench.pop()  # several students on one teacher pass, against their separate steps
    assert 0 < joint["ratio"] < 1.5 and len(joint["separate_ms_step"]) == 2 and joint["ms_step"] > 0
    for row in bench:
        assert row["img_per_s"] > 0 and 0 < row["mfu"] and row["peak_mem_gib"] > 0 and row["ms_step"] > 0
        assert row["precision"] in ("bf16", "fp32") and "peak" in row["peak_source"]


@pytest.mark.slow
def test_a_hanging_check_is_killed_at_its_timeout_and_recorded():
    budget = gpu_check.Budget(60)
    t0 = time.monotonic()
    rec = gpu_check.run_command("hang", ["-c", "import time; print('started', flush=True); time.sleep(60)"],
                                timeout=4, budget=budget)
    assert rec["status"] == "failed" and rec["error"] == "timed out after 4 s"
    assert "started" in rec["output_tail"] and time.monotonic() - t0 < 30


def test_a_failing_check_keeps_its_exit_code_and_last_line():
    rec = gpu_check.run_command("fail", ["-c", "import sys; print('boom: disk on fire', file=sys.stderr); "
                                               "sys.exit(3)"], timeout=30, budget=gpu_check.Budget(60))
    assert rec["status"] == "failed" and rec["error"] == "exit code 3, expected 0: boom: disk on fire"


def test_wrong_output_fails_the_check_and_a_spent_budget_skips_it():
    def verify(output):
        gpu_check.expect("expected" in output, "did not print 'expected'")
    rec = gpu_check.run_command("wrong", ["-c", "print('something else')"], timeout=30,
                                budget=gpu_check.Budget(60), verify=verify)
    assert rec["status"] == "failed" and "did not print 'expected'" in rec["error"]
    rec = gpu_check.run_command("late", ["-c", "print(1)"], timeout=30, budget=gpu_check.Budget(2))
    assert rec["status"] == "skipped" and rec["error"].startswith("skipped:") and rec["seconds"] == 0.0



@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_budget_is_one_line_exit_2(tmp_path, capsys, value):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--budget-s", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"tools.gpu_check: error: --budget-s must be a finite number, got {value}"]
    assert not out.exists()
