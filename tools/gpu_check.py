"""One-command GPU check: CUDA training, resume, the two feature evaluations and the step benchmarks, one JSON.

    bash scripts/gpu_check.sh [--out gpu_check.json] [--budget-s 450] [--bench-batch 128]
    python -m tools.gpu_check --device cpu --dry-run --out /tmp/gpu_check.json   # the same path, tiny, on CPU

Needs only torch, torchvision, timm, tensorboard and numpy, and nothing from the network: the data (an
ImageFolder of noisy single-colour JPEGs) and a random-weight DINOv2 ViT-S/14 teacher in the official
format are written to a temporary folder first. Then, each in its own process with its own timeout:

    env                 torch / CUDA versions, device name, bf16 support, memory
    pretrain_bf16       a few steps of pretrain.main on the GPU under bf16, checkpoints and exports
    pretrain_fp16       the same under fp16 (GradScaler; the teacher in its --teacher-dtype auto dtype)
    resume_signal       pretrain.main stopped by SIGTERM after step 1: checkpoint and exit 75 ...
    resume_continue     ... then the same command resumes and finishes
    pretrain_gpu_data   one epoch under bf16 with --data-pipeline gpu (JPEG decode + augmentation on the GPU)
    linear_eval         one short linear probe of the bf16 student (linear_eval.main)
    fine_grained        one feature pass + logistic regression of the bf16 student (fine_grained.main)
    bench_*             tools.benchmark for ViT-S/14 <- DINOv2-B/14 and ViT-B/14 <- DINOv2-L/14 at 224 px,
                        eager and --compile: img/s, MFU against the GPU's bf16 data-sheet peak, peak memory
    bench_joint_*       ViT-Ti + S + B /14 <- DINOv2-L/14 at 224 px on one teacher pass, against the three
                        separate steps (alternating): the ratio, each student's time and peak memory
    data                the loader (tools.benchmark --data on ImageNet-like test JPEGs, one core): images/s
                        per core of timm's pipeline and ours (CPU-only and GPU-worker), GPU decode + augment
                        images/s on the GPU, and the cores per GPU each needs to feed the bench_* step rates

Every check records status (ok / failed / skipped), error, seconds and what it measured. A check that hangs
is killed at its timeout; the whole run stays within --budget-s (later checks get what is left, or are
skipped). On a machine without a CUDA GPU the command prints a message and exits 0 at once. Exit code:
0 when every check that ran passed, 1 otherwise (the JSON says which).
--dry-run: the same checks with tiny models, images and step counts (seconds on a CPU; torch.compile
checks are skipped there because compiling takes minutes on a CPU). tests/tools/test_gpu_check.py runs it.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from common.config import CheckedArgumentParser
from common.errors import ConfigError, cli
from common.log import write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_PREEMPTED = 75  # pretrain.engine's code after a signal and a checkpoint
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40)]
TAIL_CHARS = 3000  # output kept in the JSON for a failed check
MIN_CHECK_S = 5.0  # with less of the budget left, a check is skipped rather than started


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""
    student_kwargs: str  # pretrain.main --student-kwargs ("" = the full-size student)
    input_size: int
    batch: int
    images_per_class: int
    pretrain_epochs: int
    eval_image_size: int
    bench_pairs: tuple  # (student, teacher, student kwargs, input size, batch)
    bench_steps: int
    bench_warmup: int
    compile: bool
    workers: int
    timeout_s: dict = field(default_factory=dict)
    joint: tuple = ()  # (students, teacher, student kwargs, input size, batch): one teacher pass, several students
    data_images: int = 96  # the data row: test JPEGs the loader benchmark decodes and augments


def gpu_sizes(bench_batch: int) -> Sizes:
    return Sizes("", 112, 16, 24, 2, 112,
                 (("vit_small", "dinov2_vitb14", "", 224, bench_batch),
                  ("vit_base", "dinov2_vitl14", "", 224, bench_batch)),
                 bench_steps=10, bench_warmup=3, compile=True, workers=2,
                 timeout_s={"pretrain": 150, "eval": 120, "bench": 150, "bench_compile": 300},
                 joint=("vit_tiny,vit_small,vit_base", "dinov2_vitl14", "", 224, bench_batch))


def dry_sizes() -> Sizes:
    tiny = "depth=4,embed_dim=32,num_heads=2"  # 4 blocks: linear_eval's heads read the last 4
    return Sizes(tiny, 28, 4, 6, 2, 28,
                 (("vit_tiny", "dinov2_vits14", tiny, 28, 2),),  # one pair: the two GPU pairs differ in size only
                 bench_steps=1, bench_warmup=0, compile=False, workers=0,
                 timeout_s={"pretrain": 180, "eval": 180, "bench": 180, "bench_compile": 300},
                 joint=("vit_tiny,vit_small", "dinov2_vits14", f"{tiny};{tiny}", 28, 2), data_images=8)


def parse_args(argv=None):
    p = CheckedArgumentParser("tools.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="output/gpu_check.json", help="the JSON report (its folder is created)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and steps: the same code path in seconds")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all checks together")
    p.add_argument("--bench-batch", type=int, default=128, help="per-GPU batch of the 224 px benchmarks")
    p.add_argument("--keep", action="store_true", help="keep the temporary data and run folders (path printed)")
    return p.parse_args(argv)


# ---- synthetic inputs ------------------------------------------------------------------------------------
def write_colour_folder(root: str, per_class: int, size: int, seed: int) -> str:
    """ROOT/<class>/<i>.jpg: noisy single-colour JPEGs, one colour per class (linearly separable)."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(os.path.join(root, f"c{c}", f"{i}.jpg"), quality=90)
    return root


def write_inputs(work: str, sizes: Sizes) -> dict:
    """The image folders and a random official-format DINOv2 ViT-S/14 teacher file."""
    import models

    size = max(sizes.input_size, sizes.eval_image_size) + 16
    data = {split: write_colour_folder(os.path.join(work, "data", split), n, size, seed)
            for split, n, seed in (("train", sizes.images_per_class, 0), ("val", 2, 1), ("test", 3, 2))}
    torch.manual_seed(0)
    teacher = os.path.join(work, "dinov2_vits14_random.pth")
    torch.save(models.build_vit("vit_small", patch_size=14, img_size=518).state_dict(), teacher)
    return {**data, "teacher": teacher, "fg_root": os.path.join(work, "data")}


# ---- running one check -----------------------------------------------------------------------------------
class Budget:
    """The wall-clock budget shared by the checks."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class CheckFailed(Exception):
    """A check ran but its output is not what it should be (raised by the verifiers; survives python -O)."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run_command(name: str, argv: list[str], timeout: float, budget: Budget, env: dict | None = None,
                expect_rc: int = 0, verify=None) -> dict:
    """Run `python argv` as one check: ok / failed (error) / skipped (no budget left), seconds, metrics."""
    record = {"name": name, "command": ["python", *argv], "status": "skipped", "error": None, "seconds": 0.0,
              "timeout_s": round(min(timeout, budget.left()), 1), "metrics": {}}
    if budget.left() < MIN_CHECK_S:
        record["error"] = f"skipped: {max(budget.left(), 0):.0f} s of the budget left"
        return record
    rc, stdout, stderr, seconds = spawn(argv, env, record["timeout_s"])
    record.update(seconds=seconds, status="failed")
    output = stdout + stderr
    if rc is None:
        record.update(error=f"timed out after {record['timeout_s']:.0f} s", output_tail=output[-TAIL_CHARS:])
    elif rc != expect_rc:
        record.update(error=f"exit code {rc}, expected {expect_rc}: {_last_line(stderr or stdout)}",
                      output_tail=output[-TAIL_CHARS:])
    else:
        try:
            record.update(metrics=verify(output) if verify else {}, status="ok")
        except (CheckFailed, OSError, ValueError, KeyError) as e:
            record.update(error=f"ran, but its output is wrong: {type(e).__name__}: {e}",
                          output_tail=output[-TAIL_CHARS:])
    return record


def spawn(argv: list[str], env: dict | None, timeout: float) -> tuple:
    """(exit code or None on timeout, stdout, stderr, seconds) of `python argv` from the repository root."""
    t0 = time.monotonic()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    # its own process group, so that a timeout also ends its DataLoader / compile workers
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = None
    return rc, stdout, stderr, round(time.monotonic() - t0, 2)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


def skipped(name: str, why: str) -> dict:
    return {"name": name, "command": None, "status": "skipped", "error": f"skipped: {why}", "seconds": 0.0,
            "metrics": {}}


# ---- what each check verifies ----------------------------------------------------------------------------
def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def pretrain_verifier(out: str, precision: str, want_resume: bool = False, data_pipeline: str = "fast"):
    def verify(output: str) -> dict:
        cfg = read_json(os.path.join(out, "config.json"))
        expect(cfg["precision"] == precision, f"config.json precision {cfg['precision']}, expected {precision}")
        got = cfg.get("data_pipeline", "fast")
        expect(got == data_pipeline, f"config.json data_pipeline {got}, expected {data_pipeline}")
        with open(os.path.join(out, "log.txt")) as f:
            rows = [json.loads(line) for line in f]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        expect(bool(losses) and bool(np.isfinite(losses).all()), f"training losses {losses}")
        for name in ("student_backbone.pth", "student_backbone_ema.pth", "checkpoint.pth"):
            expect(os.path.isfile(os.path.join(out, name)), f"{name} was not written")
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
        steps = cfg["steps_per_epoch"] * cfg["epochs"]
        expect(ckpt["global_step"] == steps, f"checkpoint at step {ckpt['global_step']}, expected {steps}")
        if want_resume:
            expect("resumed from" in output, "the second run did not resume")
        return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "precision": cfg["precision"],
                "teacher_dtype": cfg.get("teacher_dtype"), "img_per_s": _last(rows, "train/img_per_s")}
    return verify


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def stopped_verifier(out: str, total_steps: int):
    def verify(output: str) -> dict:
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
        # the signal arrives after step 1; every rank sees it at the next step's all-reduce and stops after it
        expect(2 <= ckpt["global_step"] < total_steps, f"stopped checkpoint at step {ckpt['global_step']}")
        expect("stopped by a signal" in output, "no preemption message")
        return {"stopped_at_step": ckpt["global_step"]}
    return verify


def results_verifier(out: str, key: str):
    def verify(output: str) -> dict:
        results = read_json(os.path.join(out, "results.json"))
        expect(bool(np.isfinite(results[key])), f"results.json {key} = {results[key]}")
        return {key: results[key]}
    return verify


def bench_verifier(path: str):
    def verify(output: str) -> dict:
        r = read_json(path)
        expect(r["img_per_s"] > 0, f"img/s {r['img_per_s']}")
        return {k: r.get(k) for k in ("img_per_s", "ms_step", "ms_teacher", "ms_student", "ms_optimizer", "mfu",
                                       "tflops_per_s", "peak_source", "peak_mem_gib", "precision", "device_name")}
    return verify


# ---- the checks ------------------------------------------------------------------------------------------
def pretrain_argv(inputs: dict, out: str, sizes: Sizes, device: str, precision: str) -> list[str]:
    argv = ["-m", "pretrain.main", "--data-path", inputs["train"], "--output-dir", out,
            "--teacher", "dinov2_vits14", "--teacher-checkpoint", inputs["teacher"], "--student", "vit_tiny",
            "--input-size", str(sizes.input_size), "--batch-size", str(sizes.batch),
            "--epochs", str(sizes.pretrain_epochs), "--warmup-epochs", "1", "--lr", "0.05",
            "--precision", precision, "--device", device, "--num-workers", str(sizes.workers), "--log-every", "1",
            "--save-every-steps", "2", "--pca-every-epochs", "1", "--seed", "0"]
    return argv + (["--student-kwargs", sizes.student_kwargs] if sizes.student_kwargs else [])


def steps_of(sizes: Sizes) -> int:
    """Optimiser steps of each pretrain check (4 colour classes, drop_last batches)."""
    return len(COLOURS) * sizes.images_per_class // sizes.batch * sizes.pretrain_epochs


def eval_model_args(sizes: Sizes) -> list[str]:
    if not sizes.student_kwargs:
        return []
    kwargs = {k: int(v) for k, v in (item.split("=") for item in sizes.student_kwargs.split(","))}
    return ["--model-kwargs", json.dumps(kwargs)]


def plan(inputs: dict, work: str, sizes: Sizes, device: str) -> list:
    """(name, runner(budget) -> record) in order of importance: a short budget drops the benchmarks first."""
    student = os.path.join(work, "pretrain_bf16", "student_backbone.pth")
    return (pretrain_checks(inputs, work, sizes, device) + eval_checks(inputs, work, sizes, device, student)
            + bench_checks(work, sizes, device))


def pretrain_checks(inputs: dict, work: str, sizes: Sizes, device: str) -> list:
    timeout = sizes.timeout_s["pretrain"]
    checks = []
    for p in ("bf16", "fp16"):
        out = os.path.join(work, f"pretrain_{p}")
        argv = pretrain_argv(inputs, out, sizes, device, p)
        checks.append((f"pretrain_{p}", lambda b, p=p, argv=argv, out=out: run_command(
            f"pretrain_{p}", argv, timeout, b, verify=pretrain_verifier(out, p))))
    out = os.path.join(work, "pretrain_resume")
    argv = pretrain_argv(inputs, out, sizes, device, "bf16")
    # pretrain.main (argv: -m pretrain.main ...) with a SIGTERM after step 1, from the tests' fault injection
    faulty = [os.path.join("tests", "fault_injection.py"), "--signal-at-step", "1", "--", *argv[2:]]
    checks.append(("resume_signal", lambda b: run_command(
        "resume_signal", faulty, timeout, b, expect_rc=EXIT_PREEMPTED,
        verify=stopped_verifier(out, steps_of(sizes)))))
    checks.append(("resume_continue", lambda b: run_command(
        "resume_continue", argv, timeout, b, verify=pretrain_verifier(out, "bf16", want_resume=True))))
    # --data-pipeline gpu: JPEG decode (nvJPEG) + augmentation on the GPU; one epoch keeps the budget small
    gpu_out = os.path.join(work, "pretrain_gpu_data")  # own names: the lambdas above read out / argv when run
    gpu_argv = pretrain_argv(inputs, gpu_out, sizes, device, "bf16") + ["--data-pipeline", "gpu", "--epochs", "1"]
    checks.append(("pretrain_gpu_data", lambda b: run_command(
        "pretrain_gpu_data", gpu_argv, timeout, b, verify=pretrain_verifier(gpu_out, "bf16", data_pipeline="gpu"))))
    return checks


def eval_checks(inputs: dict, work: str, sizes: Sizes, device: str, student: str) -> list:
    common = ["--arch", "vit_tiny", *eval_model_args(sizes), "--pretrained", student, "--image-size",
              str(sizes.eval_image_size), "--num-workers", str(sizes.workers), "--device", device]
    le_out, fg_out = os.path.join(work, "linear_eval"), os.path.join(work, "fine_grained")
    linear = ["-m", "linear_eval.main", "--train-root", inputs["train"], "--val-root", inputs["val"], *common,
              "--batch-size", "8", "--epochs", "1", "--epoch-length", "4", "--eval-period", "4",
              "--lrs", "1e-3", "0.1", "--output-dir", le_out]
    fine = ["-m", "fine_grained.main", "--dataset", "imagefolder", "--data-root", inputs["fg_root"], *common,
            "--batch-size", "16", "--output-dir", fg_out, "--cache-dir", os.path.join(work, "fg_cache")]
    timeout = sizes.timeout_s["eval"]
    return [("linear_eval", lambda b: run_command("linear_eval", linear, timeout, b,
                                                  verify=results_verifier(le_out, "top1"))),
            ("fine_grained", lambda b: run_command("fine_grained", fine, timeout, b,
                                                   verify=results_verifier(fg_out, "test_score")))]


def bench_checks(work: str, sizes: Sizes, device: str) -> list:
    """tools.benchmark per pair, eager first (all pairs), then --compile."""
    checks = []
    for compiled in (False, True):
        for student, teacher, kwargs, size, batch in sizes.bench_pairs:
            name = f"bench_{student}_{teacher}_{'compile' if compiled else 'eager'}"
            if compiled and not sizes.compile:
                checks.append((name, lambda b, name=name: skipped(name, "torch.compile is not timed in a dry run")))
                continue
            path = os.path.join(work, f"{name}.json")
            argv = ["-m", "tools.benchmark", "--teacher", teacher, "--student", student,
                    "--batch-size", str(batch), "--input-size", str(size), "--device", device,
                    "--steps", str(sizes.bench_steps), "--warmup", str(sizes.bench_warmup), "--json", path]
            argv += (["--student-kwargs", kwargs] if kwargs else []) + (["--compile"] if compiled else [])
            timeout = sizes.timeout_s["bench_compile" if compiled else "bench"]
            checks.append((name, lambda b, name=name, argv=argv, timeout=timeout, path=path: run_command(
                name, argv, timeout, b, verify=bench_verifier(path))))
    if sizes.joint:
        checks.append(joint_check(work, sizes, device))
    checks.append(data_check(work, sizes))
    return checks


def data_check(work: str, sizes: Sizes):
    """The loader row: img/s per CPU core (timm's / ours) and GPU decode img/s against the measured step rates."""
    path = os.path.join(work, "bench_data.json")
    argv = ["-m", "tools.benchmark_data", "--data", "make:" + os.path.join(work, "data_jpegs"), "--images",
            str(sizes.data_images), "--rounds", "1", "--batch", "8", "--no-breakdown", "--json", path]
    return ("data", lambda b: run_command("data", argv, sizes.timeout_s["bench"], b,
                                          verify=data_verifier(path, work)))


def data_verifier(path: str, work: str):
    def verify(output: str) -> dict:
        r = read_json(path)
        rates = {k: r[f"{k}_img_per_cpu_s"] for k in ("timm", "cpu", "gpu_worker")}
        expect(all(v > 0 for v in rates.values()), f"loader img/s per core {rates}")
        steps = {}
        for name in sorted(os.listdir(work)):
            if name.startswith("bench_") and name.endswith("_eager.json"):
                steps[name[6:-11]] = read_json(os.path.join(work, name)).get("img_per_s", 0)
        cores = {pair: {k: round(step / v, 1) for k, v in rates.items()} for pair, step in steps.items() if step}
        return {"img_per_cpu_s": rates, "gpu_decode_augment_img_per_s": r.get("gpu_decode_augment_img_per_s"),
                "cores_per_gpu_for_measured_steps": cores, "cpu": r.get("cpu")}
    return verify


def joint_check(work: str, sizes: Sizes, device: str):
    """tools.benchmark with several students: the joint step against the separate ones (eager)."""
    students, teacher, kwargs, size, batch = sizes.joint
    name = f"bench_joint_{students.replace(',', '+')}_{teacher}"
    path = os.path.join(work, f"{name}.json")
    argv = ["-m", "tools.benchmark", "--teacher", teacher, "--student", students, "--batch-size", str(batch),
            "--input-size", str(size), "--device", device, "--steps", str(sizes.bench_steps),
            "--warmup", str(sizes.bench_warmup), "--json", path] + (["--student-kwargs", kwargs] if kwargs else [])
    return (name, lambda b: run_command(name, argv, sizes.timeout_s["bench"] * 2, b, verify=joint_verifier(path)))


def joint_verifier(path: str):
    def verify(output: str) -> dict:
        r = read_json(path)
        expect(0 < r["ratio"] < 1.5 and len(r["rows"]) == len(r["students"]) + 1, f"ratio {r.get('ratio')}")
        joint = r["rows"][0]
        return {"ratio": r["ratio"], "ratio_cpu": r["ratio_cpu"], "img_per_s": joint["img_per_s"],
                "ms_step": joint["ms_step"], "separate_ms_step": [row["ms_step"] for row in r["rows"][1:]],
                "peak_mem_gib": {k[len("peak_mem_gib:"):]: v for k, v in joint.items() if k.startswith("peak_mem_gib:")},
                "precision": r["precision"], "device_name": r.get("device_name")}
    return verify


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported(),
                   device_count=torch.cuda.device_count())
    else:
        from common.precision import cpu_native_bf16

        env.update(device_name="cpu", cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   cpu_native_bf16=cpu_native_bf16()[0])
    return env


def benchmark_table(checks: list[dict]) -> list[dict]:
    """The benchmark rows of the report, one per pair and mode."""
    rows = []
    for c in checks:
        if c["name"].startswith("bench_") and c["status"] == "ok":
            rows.append({"check": c["name"], **c["metrics"]})
    return rows


def prepare_inputs(work: str, sizes: Sizes) -> tuple[dict, dict | None]:
    """(the `inputs` check record, the inputs or None when they could not be written)."""
    t0 = time.monotonic()
    record = {"name": "inputs", "command": None, "status": "ok", "error": None, "metrics": {"work_dir": work}}
    inputs = None
    try:
        inputs = write_inputs(work, sizes)
    except OSError as e:  # a full or read-only temp dir: nothing else can run
        record.update(status="failed", error=f"cannot write the synthetic inputs: {e}")
    return {**record, "seconds": round(time.monotonic() - t0, 2)}, inputs


def run_all(a, sizes: Sizes, work: str) -> dict:
    t0 = time.monotonic()
    budget = Budget(a.budget_s)
    first, inputs = prepare_inputs(work, sizes)
    report = {"tool": "tools.gpu_check", "dry_run": a.dry_run, "device": a.device, "budget_s": a.budget_s,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": environment(a.device), "checks": [first]}
    for name, runner in plan(inputs, work, sizes, a.device) if inputs else []:
        record = runner(budget)
        report["checks"].append(record)
        print(f"gpu_check: {name}: {record['status']} ({record['seconds']:.1f} s)"
              + (f" {record['error']}" if record["error"] else ""), flush=True)
    report["benchmarks"] = benchmark_table(report["checks"])
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("ok", "failed", "skipped")}
    report.update(summary=counts, seconds=round(time.monotonic() - t0, 1))
    return report


@cli("tools.gpu_check")
def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cpu" and not a.dry_run:
        raise ConfigError("--device cpu is for --dry-run only (the full-size check needs a GPU)")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("tools.gpu_check: no CUDA GPU is visible; nothing to check on this machine "
              "(the CPU test suite covers the rest; `--device cpu --dry-run` exercises this check's path)")
        return 0
    out = os.path.abspath(a.out)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {a.out}: cannot create its folder ({e.strerror})")
    sizes = dry_sizes() if a.dry_run else gpu_sizes(a.bench_batch)
    work = tempfile.mkdtemp(prefix="proteus_gpu_check_")
    try:
        report = run_all(a, sizes, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_json(out, report)
    s = report["summary"]
    print(f"tools.gpu_check: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped in "
          f"{report['seconds']:.0f} s; report: {out}")
    for row in report["benchmarks"]:
        if "ratio" in row:  # several students on one teacher pass
            print(f"  {row['check']}: joint {row['img_per_s']:.1f} img/s, joint / separate {row['ratio']:.3f} "
                  f"({row['precision']})")
            continue
        print(f"  {row['check']}: {row['img_per_s']:.1f} img/s, MFU {100 * row['mfu']:.1f} %, "
              f"peak {row['peak_mem_gib']:.1f} GiB ({row['precision']})")
    data = next((c for c in report["checks"] if c["name"] == "data" and c["status"] == "ok"), None)
    if data is not None:
        m = data["metrics"]
        print(f"  data: img/s per core timm {m['img_per_cpu_s']['timm']:.0f}, ours CPU-only "
              f"{m['img_per_cpu_s']['cpu']:.0f}, GPU worker {m['img_per_cpu_s']['gpu_worker']:.0f}; GPU decode "
              f"{m['gpu_decode_augment_img_per_s'] or 0:.0f} img/s; cores per GPU {m['cores_per_gpu_for_measured_steps']}")
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
