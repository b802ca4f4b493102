"""Time full Proteus training steps: img/s, ms split teacher / student / optimizer, memory, FLOP/s, MFU.

    python -m pretrain.benchmark --teacher dinov2_vits14 --student vit_tiny --batch-size 16 --input-size 112 \\
        --precision bf16 --device cpu --steps 10 --ablations --json bench.json

A step is the trainer's own step (pretrain.engine.Trainer): teacher forward (inference mode), one student
forward + backward over [unmasked views, masked views], AdamW + EMA. Inputs are random tensors already on
the device, so data loading is excluded. The teacher has random weights unless --teacher-checkpoint is set
(speed does not depend on the values). Parts are timed with a device synchronisation between them.

FLOPs come from torch.utils.flop_counter on one step (matmuls, convolutions, attention). MFU = achieved
FLOP/s / peak: on GPU the device's dense bf16 (or fp32) peak from the vendor table below, else a
measured matmul peak; on CPU a measured matmul peak (4096^2 matmuls in the run's dtype, all threads).
Peak memory: CUDA max allocated; CPU: the process's peak resident set size (includes Python and torch).

--ablations starts from an original-Proteus-like step (fp32, attention without SDPA, the masked view run
for the whole batch as a second pass, foreach AdamW) and adds one speed-up at a time.
"""
import argparse
import os
import resource
import tempfile
import time
from contextlib import contextmanager

import torch

import models
from models.teachers import DINOV2_SIZES, SYNCLR
from common.dist import DistInfo, resolve_device
from common.log import MetricLogger, write_json
from common import optim
from .engine import Trainer
from .losses import ProteusDistiller, select_objectives
from .masking import MaskGenerator

# dense bf16 / fp32 tensor peaks in TFLOP/s (vendor data sheets; SXM parts)
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
                   "A10": (125.0, 31.2), "L4": (121.0, 30.3), "V100": (125.0, 15.7)}


def parse_args(argv=None):
    p = argparse.ArgumentParser("pretrain.benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="dinov2_vitb14")
    p.add_argument("--teacher-checkpoint", default="", help="official-format weights (default: random)")
    p.add_argument("--student", default="vit_small")
    p.add_argument("--student-kwargs", default="", help="e.g. depth=2,embed_dim=64,num_heads=2")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mask-probability", type=float, default=0.5)
    p.add_argument("--mask-ratio", type=float, nargs="+", default=[0.5])
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    p.add_argument("--fused-adamw", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--no-sdpa", action="store_true", help="plain attention instead of fused SDPA")
    p.add_argument("--two-pass", action="store_true", help="the original's separate masked pass over all B")
    p.add_argument("--ablations", action="store_true", help="also time the step without each speed-up")
    p.add_argument("--ablate-compile", action="store_true", help="include torch.compile in --ablations (slow)")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


class TwoPassDistiller(ProteusDistiller):
    """The original's student computation: an unmasked and a masked pass over the whole batch."""

    def student_pass(self, x, masks, masked_rows):
        if self.patch_head is None:
            return super().student_pass(x, masks, masked_rows)
        clean = self.student.forward_features(x)
        masked = self.student.forward_features(x, masks)
        return clean["cls"], clean["patch"], masked["patch"][masked_rows]


def random_teacher(name: str, checkpoint: str, size: int, tmp: str) -> models.Teacher:
    """The named teacher; DINOv2 / SynCLR without a checkpoint get random weights in the official format."""
    if not checkpoint and name.startswith(("dinov2_", "synclr_")):
        # the name -> architecture tables of models/teachers.py, so a new teacher needs no change here
        arch, patch = ((DINOV2_SIZES[name[len("dinov2_vit")]], 14) if name.startswith("dinov2_") else SYNCLR[name])
        vit = models.build_vit(arch, patch_size=patch, img_size=518 if name.startswith("dinov2_") else 224,
                               num_register_tokens=4 if name.endswith("_reg") else 0,
                               init_values=1.0 if name.startswith("dinov2_") else None)
        checkpoint = os.path.join(tmp, "teacher.pth")
        torch.save(vit.state_dict(), checkpoint)
    return models.build_teacher(name, checkpoint or None, img_size=size)


def build_trainer(a, variant: dict, teacher: models.Teacher, device: torch.device) -> Trainer:
    """A Trainer with the variant's settings; no data loader (the benchmark feeds tensors)."""
    from .main import parse_student_kwargs

    torch.manual_seed(0)
    lambdas = {"token": 1.0, "fea": 1.0, "patch": 1.0}
    objectives = select_objectives(a.teacher, lambdas, a.mask_probability)
    student = models.build_student(a.student, a.patch_size, a.input_size, **parse_student_kwargs(a.student_kwargs))
    cls = TwoPassDistiller if variant["two_pass"] else ProteusDistiller
    distiller = cls(student, teacher.embed_dim, objectives, lambdas).to(device)
    for m in distiller.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = variant["sdpa"]
    if variant["compile"]:
        distiller.student.compile()
    groups = optim.param_groups(distiller, 0.05)
    opt = optim.build_adamw(groups, 1e-4, fused={"auto": None, "on": True, "off": False}[variant["fused_adamw"]])
    sched = optim.build_cosine_schedule(opt, 1000, 10, 1e-5, 1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=variant["precision"] == "fp16")
    grid = a.input_size // a.patch_size
    mask_gen = MaskGenerator(grid * grid, a.mask_probability if "patch" in objectives else 0.0, a.mask_ratio)
    cfg = {"precision": variant["precision"], "clip_grad": 0.0}
    info = DistInfo(0, 1, 0, device)
    return Trainer(cfg, info, distiller, distiller, teacher, optim.build_ema(student, 0.99996), opt, sched, scaler,
                   mask_gen, None, None, 1, MetricLogger(None))


def prepare_teacher(teacher: models.Teacher, variant: dict, device: torch.device) -> None:
    for m in teacher.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = variant["sdpa"]
    # on GPU the frozen teacher holds bf16 weights (as pretrain.main); on CPU autocast does the casting
    dtype = torch.bfloat16 if device.type == "cuda" and variant["precision"] != "fp32" else torch.float32
    teacher.to(device=device, dtype=dtype)


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
    dev = x.device
    t, s, o = [], [], []
    with timed(dev, t):
        targets = tr.teacher_targets(x)
    with timed(dev, s):
        masks, rows = tr.mask_gen(x.shape[0])
        losses = tr.student_losses(x, masks.to(dev), rows.to(dev), targets)
        tr.backward(losses["loss"])
    with timed(dev, o):
        tr.update(want_norm=False)
    if times is not None:
        for k, v in zip(("teacher", "student", "optimizer"), (t, s, o)):
            times[k].append(v[0])


def step_flops(tr: Trainer, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        one_step(tr, x)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, description) of the peak the MFU is measured against."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                peak = fp32 if precision == "fp32" else bf16
                return peak * 1e12, f"{name} dense {precision} data-sheet peak {peak:.0f} TFLOP/s"
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, t = [], []
    for _ in range(5):
        with timed(device, t):
            a @ b
        reps.append(2 * n ** 3 / t[-1])
    return max(reps), f"measured {n}x{n} {precision} matmul peak on {device.type} ({torch.get_num_threads()} threads)"


def run_variant(a, variant: dict, teacher: models.Teacher, device: torch.device) -> dict:
    prepare_teacher(teacher, variant, device)
    tr = build_trainer(a, variant, teacher, device)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size, device=device)
    for _ in range(a.warmup):
        one_step(tr, x)
    flops = step_flops(tr, x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {"teacher": [], "student": [], "optimizer": []}
    for _ in range(a.steps):
        one_step(tr, x, times)
    ms = {k: 1e3 * sum(v) / len(v) for k, v in times.items()}
    step_s = sum(ms.values()) / 1e3
    peak, peak_desc = matmul_peak(device, variant["precision"])
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant["name"], "img_per_s": a.batch_size / step_s, "ms_step": step_s * 1e3,
            "ms_teacher": ms["teacher"], "ms_student": ms["student"], "ms_optimizer": ms["optimizer"],
            "peak_mem_gib": mem / 2**30, "tflop_per_step": flops / 1e12, "tflops_per_s": flops / step_s / 1e12,
            "mfu": flops / step_s / peak, "peak_tflops": peak / 1e12, "peak_source": peak_desc,
            **{k: v for k, v in variant.items() if k != "name"}}


def variants(a) -> list[dict]:
    requested = dict(name="requested", precision=a.precision, sdpa=not a.no_sdpa, two_pass=a.two_pass,
                     fused_adamw=a.fused_adamw, compile=a.compile)
    if not a.ablations:
        return [requested]
    steps = [dict(name="original-like: fp32, no SDPA, 2 passes, foreach AdamW", precision="fp32", sdpa=False,
                  two_pass=True, fused_adamw="off", compile=False)]
    for name, change in (("+ SDPA", {"sdpa": True}), ("+ one student pass", {"two_pass": False}),
                         (f"+ {a.precision} autocast", {"precision": a.precision}),
                         ("+ fused AdamW", {"fused_adamw": "on"})):
        steps.append({**steps[-1], **change, "name": name})
    if a.ablate_compile or a.compile:
        steps.append({**steps[-1], "compile": True, "name": "+ torch.compile"})
    return steps


def print_table(results: list[dict], a, device: torch.device) -> None:
    print(f"\n{a.student}/{a.patch_size} <- {a.teacher}, batch {a.batch_size}, {a.input_size}px, {device}, "
          f"{a.steps} steps; MFU vs {results[-1]['peak_source']}")
    print(f"| variant | img/s | ms/step | teacher ms | student ms | optimizer ms | peak mem GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['img_per_s']:.1f} | {r['ms_step']:.1f} | {r['ms_teacher']:.1f} | "
              f"{r['ms_student']:.1f} | {r['ms_optimizer']:.1f} | {r['peak_mem_gib']:.2f} | "
              f"{r['tflops_per_s']:.3f} | {100 * r['mfu']:.1f}% |")


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = resolve_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = random_teacher(a.teacher, a.teacher_checkpoint, a.input_size, tmp)
    if a.compile:
        teacher.backbone.compile()
    results = [run_variant(a, v, teacher, device) for v in variants(a)]
    print_table(results, a, device)
    summary = {**results[-1], "results": results, "device": str(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "config": {k: v for k, v in vars(a).items() if k != "json"}}
    if a.json:
        write_json(a.json, summary)
    return summary


if __name__ == "__main__":
    main()
