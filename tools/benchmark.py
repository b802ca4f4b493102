"""Time full Proteus training steps: img/s, ms split teacher / student / optimizer, memory, FLOP/s, MFU.

    python -m tools.benchmark --teacher dinov2_vits14 --student vit_tiny --batch-size 16 --input-size 112 \\
        --device cpu --steps 10 --ablations --json bench.json
    python -m tools.benchmark --data IMAGE_DIR --json data.json   # the data loader: tools/benchmark_data.py

A step is the trainer's own step (pretrain.engine.Trainer): teacher forward (inference mode), one student
forward + backward over [unmasked views, masked views], AdamW + EMA. Inputs are random tensors already on
the device, so data loading is excluded. The teacher has random weights unless --teacher-checkpoint is set
(speed does not depend on the values). Parts are timed with a device synchronisation between them.

--precision auto (the default, as pretrain.main) resolves through common.precision: bf16 on GPUs with bf16
and on CPUs with native bf16 (AVX512_BF16 / AMX), else fp32. The choice and its reason are printed and
stored in the JSON. An explicit bf16 on a CPU without native bf16 runs, emulated and slow (see README).

FLOPs come from torch.utils.flop_counter on one step (matmuls, convolutions, attention). MFU = achieved
FLOP/s / peak: on GPU the device's dense bf16 (or fp32) data-sheet peak from the table below, else a
measured matmul peak; on CPU a measured 1024^2 matmul peak in the run's dtype (best of the operand layouts
a @ b, a @ b^T and a^T @ b: without native bf16, ATen's fallback bf16 GEMM runs a @ b at about 1 GFLOP/s
and the other two 15-35x faster; a 2048^2 a @ b peak took 10 minutes there). Peak memory: CUDA max allocated; CPU: the process's peak
resident set size (includes Python and torch). `CPU ms/step` is the process's CPU time per timed step (all
threads): on a shared machine, where wall time depends on the neighbours, `--threads 1` makes it the
steadier measure of the work a step needs.

--ablations starts from an original-Proteus-like step (fp32, attention without SDPA, the masked view run
for the whole batch as a second pass, foreach AdamW) and adds one speed-up at a time; under bf16/fp16 it
then takes one thing away from the default step at a time (SDPA, the one-pass student, the teacher's
autocast, on GPU its bf16 weights) to show where reduced precision costs or gains.
"""
import argparse
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

import models
from models.vit import STUDENTS
from common import optim
from common.config import ConfigArgumentParser
from common.dist import DistInfo, resolve_device
from common.errors import ConfigError, MissingFileError, UserError, cli
from common.log import MetricLogger, write_json
from common.precision import CHOICES as PRECISIONS, cpu_native_bf16, resolve_precision
from common.rundir import check_writable
from pretrain.engine import Trainer
from pretrain.losses import OBJECTIVES, ProteusDistiller, TargetSpec, select_objectives
from pretrain.config import check_student, check_teacher, teacher_weight_dtype
from pretrain.students import StudentRun, build_student_module, init_seed, seeded, student_specs
from pretrain.masking import MaskGenerator, validate_mask_config

# dense bf16 / fp32 tensor peaks in TFLOP/s (vendor data sheets; SXM parts)
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
                   "A10": (125.0, 31.2), "L4": (121.0, 30.3), "V100": (125.0, 15.7)}
CPU_PEAK_N = 1024  # matmul size of the measured CPU peak
PEAK_BUDGET_S = 2.0  # stop repeating a peak layout after this long (emulated bf16 is ~1 GFLOP/s)


def parse_args(argv=None):
    p = ConfigArgumentParser("tools.benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="dinov2_vitb14")
    p.add_argument("--teacher-checkpoint", default="", help="official-format weights (default: random)")
    p.add_argument("--teacher-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="teacher weights, as pretrain.main (auto: bf16 on GPU under bf16/fp16)")
    p.add_argument("--student", default="vit_small",
                   help="one student, or several (vit_tiny,vit_small): then the joint step (one teacher pass for "
                        "all) is timed against the separate steps, alternating in this process")
    p.add_argument("--student-kwargs", default="", help="e.g. depth=2,embed_dim=64,num_heads=2 (';' per student)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 where it is native (CUDA, AVX512_BF16/AMX CPUs), else fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--mask-probability", type=float, default=0.5)
    p.add_argument("--mask-ratio", type=float, nargs="+", default=[0.5])
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    p.add_argument("--fused-adamw", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--no-sdpa", action="store_true", help="plain attention instead of fused SDPA")
    p.add_argument("--two-pass", action="store_true", help="the original's separate masked pass over all B")
    p.add_argument("--ablations", action="store_true", help="also time the step without each speed-up")
    p.add_argument("--ablate-compile", action="store_true", help="include torch.compile in --ablations (slow)")
    p.add_argument("--json", default="", help="write the results here (its folder is created)")
    return p.parse_args(argv)


# ---- validation: every nonsense value fails here, before a model is built -------------------------------
def validate(a) -> None:
    """ConfigError for any setting the benchmark cannot time; prepares the --json folder."""
    for flag, value, low in (("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--batch-size", a.batch_size, 1),
                             ("--input-size", a.input_size, 1), ("--patch-size", a.patch_size, 1),
                             ("--threads", a.threads, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    specs = bench_specs(a)
    for spec in specs:
        if spec.arch not in STUDENTS:  # the benchmark builds DINOv2-style ViT students only
            raise ConfigError(f"unknown student {spec.arch!r}; expected one of {STUDENTS}")
    if (a.ablations or a.ablate_compile) and len(specs) > 1:
        raise ConfigError("--ablations / --ablate-compile time one student; with several --student entries the "
                          "benchmark compares the joint step against the separate ones")
    try:  # pretraining's own checks raise plain ValueErrors
        for spec in specs:
            check_student({"student": spec.arch, "student_kwargs": spec.kwargs, "input_size": a.input_size,
                           "patch_size": a.patch_size})
        check_teacher({"name": a.teacher}, {"input_size": a.input_size})
        validate_mask_config(a.mask_probability, a.mask_ratio)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if a.teacher_checkpoint and not os.path.isfile(a.teacher_checkpoint):
        raise MissingFileError(f"--teacher-checkpoint {a.teacher_checkpoint!r} does not exist")
    resolve_device(a.device)
    if a.json:
        prepare_output(a.json)


def prepare_output(path: str) -> None:
    """Create the folder of `path` now, so that a bad path fails before minutes of timing, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    check_writable(folder, f"--json {path}: cannot create its folder {folder} or write in it", "pick a writable path")
    if os.path.isdir(path):
        raise ConfigError(f"--json {path} is a folder; give a file name such as {os.path.join(path, 'bench.json')}")


# ---- building one variant's step -------------------------------------------------------------------------
class TwoPassDistiller(ProteusDistiller):
    """The original's student computation: an unmasked and a masked pass over the whole batch."""

    def student_pass(self, x, masks, masked_rows):
        if not self.masked_view:
            return super().student_pass(x, masks, masked_rows)
        clean = self.student_features(x)
        masked = self.student_features(x, masks)
        return clean["cls"], clean["patch"], masked["patch"][masked_rows]


class BenchTrainer(Trainer):
    """The trainer, with an ablation switch: `teacher_autocast = False` runs the teacher outside autocast."""
    teacher_autocast = True

    def raw_teacher_outputs(self, images: torch.Tensor) -> dict:
        if self.teacher_autocast:
            return super().raw_teacher_outputs(images)
        with torch.inference_mode():
            return {key: teacher(images) for key, teacher in self.teachers.items()}


def random_teacher(name: str, checkpoint: str, size: int, tmp: str) -> models.Teacher:
    """The named teacher; without a checkpoint, its family's random-weight builder (models.TEACHER_FAMILIES)."""
    return models.build_teacher(name, checkpoint or None, img_size=size, random_weights=not checkpoint)


def bench_specs(a) -> list:
    try:
        return student_specs({"student": a.student, "student_kwargs": a.student_kwargs, "lr": 1e-4})
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_trainer(a, variant: dict, teacher: models.Teacher, device: torch.device, specs=None) -> BenchTrainer:
    """A Trainer with the variant's settings for `specs` (default: every --student); no data loader (the
    benchmark feeds tensors). Each student's weights come from its own seeded stream, as in pretrain.main."""
    lambdas = {name: o.default_lambda for name, o in OBJECTIVES.items()}
    objectives = select_objectives(teacher.patch_targets, lambdas, a.mask_probability)
    grid = (a.input_size // a.patch_size,) * 2
    cls = TwoPassDistiller if variant["two_pass"] else ProteusDistiller
    runs = []
    for spec in specs or bench_specs(a):
        with seeded(init_seed(0, spec.key), device):
            student = build_student_module(spec, {"patch_size": a.patch_size, "input_size": a.input_size})
            target = TargetSpec(a.teacher, teacher.embed_dim, objectives, cls_dim=teacher.summary_dim)
            distiller = cls(student, [target], lambdas, grid).to(device)
        for m in distiller.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = variant["sdpa"]
        groups = optim.param_groups(distiller, 0.05)
        opt = optim.build_adamw(groups, 1e-4, fused={"auto": None, "on": True, "off": False}[variant["fused_adamw"]])
        sched = optim.build_cosine_schedule(opt, 1000, 10, 1e-5, 1e-6)
        scaler = torch.amp.GradScaler(device.type, enabled=variant["precision"] == "fp16")
        runs.append(StudentRun(spec, distiller, distiller, opt, sched, scaler, optim.build_ema(student, 0.99996), 1e-4))
    mask_gen = MaskGenerator(grid[0] * grid[1], a.mask_probability if "patch" in objectives else 0.0, a.mask_ratio)
    cfg = {"precision": variant["precision"], "clip_grad": 0.0, "seed": 0}
    tr = BenchTrainer(cfg, DistInfo(0, 1, 0, device), runs, {a.teacher: teacher}, mask_gen, None, None, 1,
                      MetricLogger(None), grids={a.teacher: (a.input_size // teacher.patch_size,) * 2})
    tr.teacher_autocast = variant["teacher_autocast"]
    return tr


def compile_step(tr: Trainer, teacher: models.Teacher) -> None:
    """torch.compile the students (in place, as pretrain.main) and, once, the shared teacher."""
    for run in tr.students:
        run.distiller.student.compile()
    if not getattr(teacher, "bench_compiled", False):  # compile variants come last (variants()): never undone
        teacher.backbone.compile()
        teacher.bench_compiled = True


def prepare_teacher(teacher: models.Teacher, variant: dict, device: torch.device) -> None:
    for m in teacher.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = variant["sdpa"]
    # the weight dtype pretrain.main would use (auto: bf16 on GPU under bf16/fp16, else fp32)
    dtype = teacher_weight_dtype({"teacher_dtype": variant["teacher_dtype"], "precision": variant["precision"]},
                                 device)
    teacher.to(device=device, dtype=dtype)


# ---- timing ----------------------------------------------------------------------------------------------
@contextmanager
def timed(device: torch.device, out: list):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out.append(time.perf_counter() - t0)


def one_step(tr: Trainer, x: torch.Tensor, times: dict | None = None) -> None:
    """The trainer's step in parts: teacher, each student's forward + backward, every optimizer step.
    `times`: lists per part ('teacher', 'student:<key>', 'optimizer'); on CUDA also 'mem:<key>', the peak
    memory of each student's pass."""
    dev = x.device
    t, o = [], []
    with timed(dev, t):
        targets = tr.teacher_targets(x)
    masks, rows = tr.mask_gen(x.shape[0])
    masks, rows = masks.to(dev), rows.to(dev)
    for run in tr.students:
        s = []
        if times is not None and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with timed(dev, s):
            losses = tr.student_losses(run, x, masks, rows, targets)
            tr.backward(run, losses["loss"])
        if times is not None:
            times.setdefault(f"student:{run.key}", []).append(s[0])
            if dev.type == "cuda":
                times.setdefault(f"mem:{run.key}", []).append(torch.cuda.max_memory_allocated(dev))
    with timed(dev, o):
        for run in tr.students:
            tr.update(run, want_norm=False)
    if times is not None:
        times.setdefault("teacher", []).append(t[0])
        times.setdefault("optimizer", []).append(o[0])


def step_flops(tr: Trainer, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        one_step(tr, x)
    return float(counter.get_total_flops())


_PEAKS: dict = {}


def matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, description) of the peak the MFU is measured against; measured once per device and dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                peak = fp32 if precision == "fp32" else bf16
                return peak * 1e12, f"{name} dense {precision} data-sheet peak {peak:.0f} TFLOP/s"
    if (str(device), precision) not in _PEAKS:
        _PEAKS[str(device), precision] = measured_matmul_peak(device, precision)
    return _PEAKS[str(device), precision]


def measured_matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    n = 4096 if device.type == "cuda" else CPU_PEAK_N
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for lhs, rhs in ((a, b), (a, b.t()), (a.t(), b)):  # ATen's fallback bf16 GEMM differs 30x between layouts
        spent, t = 0.0, []
        for rep in range(6):  # rep 0 warms up
            with timed(device, t):
                lhs @ rhs
            spent += t[-1]
            if rep:
                best = max(best, 2 * n ** 3 / t[-1])
            if spent > PEAK_BUDGET_S and rep:
                break
    return best, (f"measured {n}x{n} {precision} matmul peak on {device.type} ({torch.get_num_threads()} "
                  f"threads, best of a@b, a@b^T, a^T@b)")


def best_peak(results: list[dict], device: torch.device) -> list[dict]:
    """On CPU, measure each dtype's matmul peak again after the rows and keep the higher one: a peak measured
    while another process takes a core comes out low (MFU above 100 % at load ~3 on 2 cores)."""
    if device.type == "cuda":
        return results
    for precision in {r["precision"] for r in results}:
        before, _ = _PEAKS[str(device), precision]
        after, desc = measured_matmul_peak(device, precision)
        if after > before:
            _PEAKS[str(device), precision] = (after, desc)
    out = []
    for r in results:
        peak, desc = _PEAKS[str(device), r["precision"]]
        out.append({**r, "mfu": r["tflops_per_s"] * 1e12 / peak, "peak_tflops": peak / 1e12,
                    "peak_source": desc + ", best of before and after the rows"})
    return out


def run_variant(a, variant: dict, teacher: models.Teacher, device: torch.device) -> dict:
    prepare_teacher(teacher, variant, device)
    tr = build_trainer(a, variant, teacher, device)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size, device=device)
    flops = step_flops(tr, x)  # before compiling: the counter sees eager aten ops, not compiled kernels
    if variant["compile"]:
        compile_step(tr, teacher)
    for _ in range(a.warmup):
        one_step(tr, x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {}
    cpu0 = time.process_time()
    for _ in range(a.steps):
        one_step(tr, x, times)
    cpu_ms = 1e3 * (time.process_time() - cpu0) / a.steps
    ms = {k: 1e3 * sum(v) / len(v) for k, v in times.items() if not k.startswith("mem:")}
    ms["student"] = sum(v for k, v in ms.items() if k.startswith("student:"))
    step_s = (ms["teacher"] + ms["student"] + ms["optimizer"]) / 1e3
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak, peak_desc = matmul_peak(device, variant["precision"])
    return {"variant": variant["name"], "img_per_s": a.batch_size / step_s, "ms_step": step_s * 1e3,
            "cpu_ms_step": cpu_ms,
            "ms_teacher": ms["teacher"], "ms_student": ms["student"], "ms_optimizer": ms["optimizer"],
            "peak_mem_gib": mem / 2**30, "tflop_per_step": flops / 1e12, "tflops_per_s": flops / step_s / 1e12,
            "mfu": flops / step_s / peak, "peak_tflops": peak / 1e12, "peak_source": peak_desc,
            **{k: v for k, v in variant.items() if k != "name"}}


# ---- several students: the joint step against the separate ones --------------------------------------------
def split_ms(times: dict) -> dict:
    """Mean ms per part of the timed steps; `ms_step` their sum, `mem_gib:<key>` peak memory on CUDA."""
    out = {f"ms_{k}": 1e3 * sum(v) / len(v) for k, v in times.items() if not k.startswith("mem:")}
    out["ms_step"] = sum(out.values())
    out.update({f"peak_mem_gib:{k[4:]}": max(v) / 2**30 for k, v in times.items() if k.startswith("mem:")})
    return out


def data_cpu_ms_per_batch(a, n_images: int = 16) -> float:
    """CPU ms to make one batch: JPEG decode of an ImageNet-sized photo-like image + the DeiT training
    transform at --input-size as pretrain.main runs it on a CPU (pretrain/pipeline.py; one core; what every
    separate run pays again)."""
    import numpy as np
    from PIL import Image

    from common.data import open_image
    from pretrain.pipeline import FastDeiTTransform

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    smooth = np.stack([(xx * 0.5 + yy * 0.2) % 256, (yy * 0.7) % 256, (xx * 0.3 + 80) % 256], -1)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    tf = FastDeiTTransform(a.input_size, "rand-m9-mstd0.5-inc1", 0.25, "bicubic", finish_on_device=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "photo.jpg")
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        cpu0 = time.process_time()
        for _ in range(n_images):
            tf(tf.decode(open_image(path)))
        return 1e3 * (time.process_time() - cpu0) / n_images * a.batch_size


def run_joint(a, variant: dict, teacher: models.Teacher, device: torch.device) -> dict:
    """The joint step (one teacher pass for every student) against each student's own step, alternating step
    by step in this process, so that both see the same machine state (neighbours, clocks, caches)."""
    prepare_teacher(teacher, variant, device)
    specs = bench_specs(a)
    joint = build_trainer(a, variant, teacher, device, specs)
    alone = [build_trainer(a, variant, teacher, device, [spec]) for spec in specs]
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size, device=device)
    if variant["compile"]:
        for tr in (joint, *alone):
            compile_step(tr, teacher)
    for _ in range(a.warmup):
        for tr in (joint, *alone):
            one_step(tr, x)
    times = [{} for _ in (joint, *alone)]
    cpu = [0.0] * len(times)
    for _ in range(a.steps):
        for i, tr in enumerate((joint, *alone)):
            cpu0 = time.process_time()
            one_step(tr, x, times[i])
            cpu[i] += time.process_time() - cpu0
    rows = []
    for i, (tr, t) in enumerate(zip((joint, *alone), times)):
        row = {"step": "joint" if i == 0 else f"separate {specs[i - 1].key}", **split_ms(t),
               "cpu_ms_step": 1e3 * cpu[i] / a.steps,
               "memory_mib": {run.key: run.memory_mib() for run in tr.students}}
        row["img_per_s"] = a.batch_size / (row["ms_step"] / 1e3)
        rows.append(row)
    separate_ms = sum(r["ms_step"] for r in rows[1:])
    data_ms = data_cpu_ms_per_batch(a)
    n = len(specs)
    return {"mode": "joint", "students": [s.key for s in specs], "rows": rows,
            "ratio": rows[0]["ms_step"] / separate_ms,
            "ratio_cpu": rows[0]["cpu_ms_step"] / sum(r["cpu_ms_step"] for r in rows[1:]),
            "data_cpu_ms_per_batch": data_ms,
            "ratio_with_data": (rows[0]["cpu_ms_step"] + data_ms) / (sum(r["cpu_ms_step"] for r in rows[1:])
                                                                     + n * data_ms),
            **{k: v for k, v in variant.items() if k != "name"}}


def print_joint(result: dict, a, device: torch.device) -> None:
    keys = result["students"]
    print(f"\n{' + '.join(keys)} <- {a.teacher}, batch {a.batch_size}, {a.input_size}px, {device}, "
          f"{result['precision']}, {a.steps} alternating steps")
    print("| step | img/s | ms/step | CPU ms/step | teacher ms | " + " | ".join(f"{k} ms" for k in keys)
          + " | optimizer ms |")
    print("|---|---|---|---|---|" + "---|" * len(keys) + "---|")
    for r in result["rows"]:
        parts = " | ".join(f"{r[f'ms_student:{k}']:.1f}" if f"ms_student:{k}" in r else "-" for k in keys)
        print(f"| {r['step']} | {r['img_per_s']:.2f} | {r['ms_step']:.1f} | {r['cpu_ms_step']:.0f} | "
              f"{r['ms_teacher']:.1f} | {parts} | {r['ms_optimizer']:.1f} |")
    print(f"joint / sum of separate steps: {result['ratio']:.3f} (wall), {result['ratio_cpu']:.3f} (CPU time); "
          f"with data loading ({result['data_cpu_ms_per_batch']:.0f} CPU ms per batch, paid once jointly): "
          f"{result['ratio_with_data']:.3f}")


def variants(a, precision: str, device: torch.device) -> list[dict]:
    """The requested step, or with --ablations the chain of speed-ups and the reduced-precision ablations."""
    requested = dict(name="requested", precision=precision, sdpa=not a.no_sdpa, two_pass=a.two_pass,
                     fused_adamw=a.fused_adamw, compile=a.compile, teacher_dtype=a.teacher_dtype,
                     teacher_autocast=True, headline=True)
    if not a.ablations:
        return [requested]
    steps = [dict(name="original-like: fp32, no SDPA, 2 passes, foreach AdamW", precision="fp32", sdpa=False,
                  two_pass=True, fused_adamw="off", compile=False, teacher_dtype="auto", teacher_autocast=True)]
    chain = [("+ SDPA", {"sdpa": True}), ("+ one student pass", {"two_pass": False})]
    if precision != "fp32":
        chain.append((f"+ {precision} autocast", {"precision": precision}))
    chain.append(("+ fused AdamW", {"fused_adamw": "on"}))
    for name, change in chain:
        steps.append({**steps[-1], **change, "name": name})
    if a.ablate_compile or a.compile:
        steps.append({**steps[-1], "compile": True, "name": "+ torch.compile"})
    steps = [{**s, "headline": False} for s in steps]
    steps[-1]["headline"] = True  # the default step: the row the summary reports
    if precision == "fp32":
        return steps
    full = {**steps[-1], "headline": False}
    leave_out = [(f"{precision} default - SDPA (plain attention)", {"sdpa": False}),
                 (f"{precision} default - one pass (2 passes)", {"two_pass": True}),
                 (f"{precision} default, teacher outside autocast (fp32)",
                  {"teacher_autocast": False, "teacher_dtype": "fp32"})]
    if device.type == "cuda":
        leave_out.append((f"{precision} default, teacher fp32 weights under autocast", {"teacher_dtype": "fp32"}))
    return steps + [{**full, **change, "name": name} for name, change in leave_out]


def print_table(results: list[dict], a, device: torch.device) -> None:
    print(f"\n{a.student}/{a.patch_size} <- {a.teacher}, batch {a.batch_size}, {a.input_size}px, {device}, "
          f"{a.steps} steps; MFU vs each row's peak: {results[-1]['peak_source']}")
    print("| variant | img/s | ms/step | CPU ms/step | teacher ms | student ms | optimizer ms | peak mem GiB | "
          "TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['img_per_s']:.2f} | {r['ms_step']:.1f} | {r['cpu_ms_step']:.0f} | "
              f"{r['ms_teacher']:.1f} | {r['ms_student']:.1f} | {r['ms_optimizer']:.1f} | {r['peak_mem_gib']:.2f} | "
              f"{r['tflops_per_s']:.3f} | {100 * r['mfu']:.1f}% |")


def hardware(device: torch.device) -> dict:
    """What the numbers depend on: the device name, and on CPU whether bf16 is native."""
    if device.type == "cuda":
        return {"device_name": torch.cuda.get_device_name(device)}
    native, why = cpu_native_bf16()
    return {"device_name": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": native, "cpu_bf16_reason": why}


@cli("tools.benchmark")
def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(x == "--data" or x.startswith("--data=") for x in args):  # the loader benchmark (#21)
        from tools.benchmark_data import main as data_main

        return data_main(args)
    a = parse_args(args)
    validate(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    precision, reason = resolve_precision(a.precision, device)
    print(f"tools.benchmark: precision {precision} ({reason})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = random_teacher(a.teacher, a.teacher_checkpoint, a.input_size, tmp)
    if len(bench_specs(a)) > 1:
        return finish_joint(a, run_joint(a, variants(a, precision, device)[0], teacher, device), device, precision,
                            reason)
    results = best_peak([run_variant(a, v, teacher, device) for v in variants(a, precision, device)], device)
    print_table(results, a, device)
    headline = next(r for r in results if r["headline"])
    summary = {**headline, "results": results, "device": str(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "precision": precision, "precision_reason": reason,
               **hardware(device), "config": {k: v for k, v in vars(a).items() if k != "json"}}
    if a.json:
        write_json(a.json, summary)
        print(f"wrote {a.json}")
    return 0


def finish_joint(a, result: dict, device: torch.device, precision: str, reason: str) -> int:
    print_joint(result, a, device)
    if a.json:
        write_json(a.json, {**result, "device": str(device), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "precision": precision, "precision_reason": reason,
                            **hardware(device), "config": {k: v for k, v in vars(a).items() if k != "json"}})
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
