"""Several students, one teacher pass: the per-student half of the trainer (issue #13).

`--student vit_tiny,vit_small,timm:resnet18` trains every listed student on the same augmented batch, the
same masks and the same teacher targets. Each student has its own heads, AdamW, LR schedule, grad scaler
and EMA (a `StudentRun`), its own losses in the logs and its own exports in OUTPUT/<key>/. One student
keeps the single-run layout (no key prefixes, exports at the top of OUTPUT).

Two rules make a student's training independent of which others train beside it, so that a joint run
equals separate runs bitwise on CPU fp32:
- init: a student's weights and heads are drawn from a generator seeded by (seed, key), not from the
  global stream (which the data pipeline also draws from);
- stochastic depth: each student's forward draws from a stream seeded by (seed, rank, key, step), so it
  needs no state in the checkpoint and a resume replays it exactly.
"""
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

import models
from common.errors import ConfigError

KEY_SEPARATOR = "/"  # <key>/<loss name> in logs and TensorBoard


@dataclass(frozen=True)
class StudentSpec:
    """One entry of --student, resolved: what identifies it on resume and what it trains with."""
    key: str  # unique, filesystem-safe: the arch name ('timm:' -> 'timm-'), '-2', '-3' for repeats
    arch: str  # vit_tiny ... or timm:<name>
    kwargs: str  # its --student-kwargs entry ('' = none)
    drop_path: float
    lr: float  # base learning rate (before the linear scaling rule)

    def as_dict(self) -> dict:
        return {"key": self.key, "arch": self.arch, "kwargs": self.kwargs, "drop_path": self.drop_path,
                "lr": self.lr}


def split_entries(text: str, sep: str, n: int, flag: str) -> list[str]:
    """Per-student values: '' -> n empty entries; one entry -> every student; else exactly n entries."""
    parts = [p.strip() for p in text.split(sep)] if text.strip() else [""]
    if len(parts) == 1:
        return parts * n
    if len(parts) != n:
        raise ConfigError(f"{flag} has {len(parts)} entries for {n} students: give one (every student) or one per "
                         f"student, in --student order, separated by {sep!r} (an empty entry keeps the default)")
    return parts


def student_specs(cfg: dict) -> list[StudentSpec]:
    """The --student list with each student's kwargs, drop path and base lr (ConfigError on a bad list)."""
    archs = [a.strip() for a in str(cfg["student"]).split(",")]
    if not archs or "" in archs:
        raise ConfigError(f"--student takes comma-separated names (vit_tiny,vit_small,timm:resnet18), got "
                         f"{cfg['student']!r}")
    n = len(archs)
    kwargs = split_entries(cfg.get("student_kwargs") or "", ";", n, "--student-kwargs")
    drops = split_entries(str(cfg.get("student_drop_path") or ""), ",", n, "--student-drop-path")
    lrs = split_entries(str(cfg.get("student_lr") or ""), ",", n, "--student-lr")
    specs, seen = [], {}
    for arch, kw, dp, lr in zip(archs, kwargs, drops, lrs):
        base = arch.replace("timm:", "timm-").replace("/", "-")
        seen[base] = seen.get(base, 0) + 1
        key = base if seen[base] == 1 else f"{base}-{seen[base]}"
        specs.append(StudentSpec(key, arch, kw, _number(dp, cfg.get("drop_path", 0.0), "--student-drop-path"),
                                 _number(lr, cfg["lr"], "--student-lr")))
    return specs


def _number(text: str, default: float, flag: str) -> float:
    import math

    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError as e:
        raise ConfigError(f"{flag} takes numbers (comma-separated, one per student), got {text!r}") from e
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{flag} values must be finite and >= 0, got {value}")
    return value


def safe_key(key) -> bool:
    """A student key is a folder name of OUTPUT: letters, digits, '_', '-', '.', never '.' or '..'."""
    import re

    return isinstance(key, str) and bool(re.fullmatch(r"[A-Za-z0-9_.-]+", key)) and key not in (".", "..")


def init_seed(seed: int, key: str) -> int:
    """The seed of a student's initial weights: depends on the run's seed and the student alone."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63


@contextmanager
def seeded(seed: int, device: torch.device):
    """Draw from a private stream seeded by `seed`; the global streams (CPU, and CUDA on `device`) are left as
    they were."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class StudentRun:
    """One student and everything that trains it. `model` is the DDP-wrapped `distiller` (or the distiller).

    `start_step`: the global step at which it joined (0, or later for a student added on resume): its LR
    schedule runs from there to the end of the run, warm-up included.
    """
    spec: StudentSpec
    distiller: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object
    lr_scaled: float
    start_step: int = 0
    bad_streak: int = 0

    @property
    def key(self) -> str:
        return self.spec.key

    def rng(self, seed: int, rank: int, step: int, device: torch.device, micro: int = 0):
        """The stochastic-depth stream of this student at `step`, micro-batch `micro` (gradient accumulation);
        nothing to fork without drop path."""
        if self.spec.drop_path <= 0:
            return nullcontext()
        return seeded((init_seed(seed, self.key) + 7_919 * rank + 104_729 * step + 1_299_709 * micro) % 2**63, device)

    def step_schedule(self, global_step: int) -> None:
        self.scheduler.step_update(global_step - self.start_step)

    def memory_mib(self) -> dict:
        """What this student holds between steps, in MiB: parameters (student + heads), gradients, AdamW's two
        moments, the EMA copy (activations come on top, per step: tools.benchmark measures them on GPU)."""
        mib = 2.0 ** -20
        params = [p for p in self.distiller.parameters()]
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        ema = sum(p.numel() * p.element_size() for p in self.ema.module.parameters()) if self.ema else 0
        return {"params": sum(p.numel() * p.element_size() for p in params) * mib, "grads": trainable * mib,
                "adamw": 2 * trainable * mib, "ema": ema * mib}


def prefixed(key: str | None, names) -> list[str]:
    """Loss / metric names of one student: bare for a single student, '<key>/<name>' for several."""
    return list(names) if key is None else [f"{key}{KEY_SEPARATOR}{n}" for n in names]


def build_student_module(spec: StudentSpec, cfg: dict) -> torch.nn.Module:
    return models.build_student(spec.arch, patch_size=cfg["patch_size"], img_size=cfg["input_size"],
                                drop_path_rate=spec.drop_path,
                                **models.parse_size_kwargs(spec.kwargs, "--student-kwargs"))
