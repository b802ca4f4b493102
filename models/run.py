"""A pretraining run as the input of every later stage: which weights, which architecture, where results go.

    run = resolve_run("output/proteus_small", student=None, ema=False)
    run.weights, run.arch, run.kwargs, run.patch_size, run.img_size, run.student, run.run_dir, run.step

`path` may be
- a run dir of `pretrain.main` (its config.json says "tool": "pretrain"): the finished export
  (`student_backbone[_ema].pth`, or `<key>/student_backbone[_ema].pth` with several students) when it is at
  least as new as `checkpoint.pth`, else `checkpoint.pth` (a run still training, or stopped);
- a per-student export folder `RUN/<key>/` of a several-student run (its config.json names `student_key`);
- a file: `checkpoint.pth` of a run (any step) or an export, read with the config.json beside it; a file
  with no pretrain config beside it (an official DINOv2 file, a copied backbone) gives no architecture,
  which the caller's flags or defaults then supply.

With several students `student` (the `--student KEY` of the evaluations and exports: the key is the
folder name under RUN, e.g. `vit_tiny`; an architecture named by exactly one student also works) picks
one; none given is an error listing the keys. `run.student` is the key to select inside a several-student
`checkpoint.pth` (None when the file holds one student). Errors are models.errors types (one line each).
"""
import json
import os
from dataclasses import dataclass, field

from .errors import ConfigError, MissingFileError
from .vit import parse_size_kwargs

CHECKPOINT = "checkpoint.pth"
EVAL_DIR = "eval"  # results of the evaluations: RUN/eval/[<key>/][step<N>/]<task>


@dataclass
class RunBackbone:
    weights: str  # the file to load (absolute)
    arch: str | None  # None: the file came with no run configuration
    kwargs: dict = field(default_factory=dict)  # size overrides (the run's --student-kwargs entry)
    patch_size: int | None = None
    img_size: int | None = None  # the run's --input-size
    student: str | None = None  # key to select inside a several-student checkpoint.pth
    key: str | None = None  # the student's key in its run (several students), else None
    run_dir: str | None = None  # the pretraining run's top folder, None when the file is not in one
    step: int | None = None  # global step of a checkpoint.pth; None for the finished exports
    config: dict = field(default_factory=dict)  # the run's config.json (one student's view for exports)

    def eval_dir(self, task: str, ema: bool = False) -> str | None:
        """Where an evaluation of these weights writes by default: RUN/eval/[<key>/][step<N>/]<task>[_ema]."""
        if self.run_dir is None:
            return None
        parts = [self.run_dir, EVAL_DIR] + ([self.key] if self.key else []) + \
            ([f"step{self.step}"] if self.step is not None else [])
        return os.path.join(*parts, task + ("_ema" if ema else ""))

    def describe(self) -> str:
        where = self.run_dir or os.path.dirname(self.weights)
        return f"run {where}" + (f" (student {self.key})" if self.key else "")


def read_run_config(folder: str) -> dict:
    """config.json of a pretrain run dir (or of a student's export folder), {} when there is none / not pretrain."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err}); fix it or pass the backbone flags") from err
    if not isinstance(cfg, dict) or cfg.get("tool", "pretrain") != "pretrain" or "student" not in cfg:
        return {}
    return cfg


def run_students(cfg: dict) -> list[dict]:
    """[{key, arch, kwargs}] of a run configuration (older runs record only --student / --student-kwargs)."""
    if isinstance(cfg.get("students"), list) and cfg["students"]:
        return [{"key": s["key"], "arch": s["arch"], "kwargs": s.get("kwargs") or ""} for s in cfg["students"]]
    arch = str(cfg["student"])
    key = cfg.get("student_key") or arch.replace("timm:", "timm-").replace("/", "-")
    return [{"key": key, "arch": arch, "kwargs": cfg.get("student_kwargs") or ""}]


def pick_student(students: list[dict], student: str | None, where: str) -> dict:
    keys = [s["key"] for s in students]
    if student is None:
        if len(students) > 1:
            raise ConfigError(f"{where} trained {len(students)} students ({', '.join(keys)}); pick one with "
                              f"--student KEY")
        return students[0]
    for s in students:
        if s["key"] == student:
            return s
    by_arch = [s for s in students if s["arch"] == student]
    if len(by_arch) == 1:
        return by_arch[0]
    raise ConfigError(f"--student {student}: {where} has no such student; its students: {', '.join(keys)}")


def resolve_run(path: str, student: str | None = None, ema: bool = False) -> RunBackbone:
    """The weights and architecture of a run dir, a student's export folder, or a file (see the module doc)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        return _from_dir(path, student, ema)
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint file not found: {path}")
    return _from_file(path, student)


def _from_dir(path: str, student: str | None, ema: bool) -> RunBackbone:
    cfg = read_run_config(path)
    if not cfg:
        raise ConfigError(f"{path} is not a pretraining run dir (no config.json of pretrain.main in it); pass the "
                          f"run dir pretrain.main wrote, or a checkpoint file")
    export = "student_backbone_ema.pth" if ema else "student_backbone.pth"
    if cfg.get("student_key") and not isinstance(cfg.get("students"), list):  # RUN/<key>/: one student's exports
        spec = pick_student(run_students(cfg), student, f"student folder {path}")
        weights = os.path.join(path, export)
        if not os.path.isfile(weights):
            raise MissingFileError(f"{weights} not found: the student folder holds no export (yet); pass the run "
                                   f"dir {os.path.dirname(path)} with --student {spec['key']}")
        return _backbone(weights, spec, cfg, run_dir=os.path.dirname(path), key=spec["key"])
    students = run_students(cfg)
    spec = pick_student(students, student, f"run {path}")
    several = len(students) > 1
    exported = os.path.join(path, spec["key"], export) if several else os.path.join(path, export)
    ckpt = os.path.join(path, CHECKPOINT)
    key = spec["key"] if several else None
    if os.path.isfile(exported) and (not os.path.isfile(ckpt) or os.path.getmtime(exported) >= os.path.getmtime(ckpt)):
        return _backbone(exported, spec, cfg, run_dir=path, key=key)
    if os.path.isfile(ckpt):
        return _backbone(ckpt, spec, cfg, run_dir=path, key=key, student=key, step=checkpoint_step(ckpt))
    raise MissingFileError(f"run {path} has neither {CHECKPOINT} nor {os.path.relpath(exported, path)} yet: "
                           f"nothing to evaluate until its first checkpoint is written")


def _from_file(path: str, student: str | None) -> RunBackbone:
    folder = os.path.dirname(path)
    cfg = read_run_config(folder)
    if not cfg:  # a file outside any run: the caller's flags say what it is
        return RunBackbone(weights=path, arch=None, student=student, step=None)
    if cfg.get("student_key") and not isinstance(cfg.get("students"), list):  # RUN/<key>/<export>
        spec = pick_student(run_students(cfg), student, f"student folder {folder}")
        return _backbone(path, spec, cfg, run_dir=os.path.dirname(folder), key=spec["key"])
    students = run_students(cfg)
    spec = pick_student(students, student, f"run {folder}")
    key = spec["key"] if len(students) > 1 else None
    is_ckpt = os.path.basename(path).startswith("checkpoint")
    return _backbone(path, spec, cfg, run_dir=folder, key=key, student=key if is_ckpt else None,
                     step=checkpoint_step(path) if is_ckpt else None)


def _backbone(weights: str, spec: dict, cfg: dict, run_dir: str, key: str | None, student: str | None = None,
              step: int | None = None) -> RunBackbone:
    kwargs = parse_size_kwargs(spec["kwargs"], "the run's --student-kwargs", ints_only=False)
    return RunBackbone(weights=weights, arch=spec["arch"], kwargs=kwargs,
                       patch_size=int(cfg.get("patch_size") or 14), img_size=int(cfg.get("input_size") or 224),
                       student=student, key=key, run_dir=run_dir, step=step, config=cfg)


def checkpoint_step(path: str) -> int | None:
    """global_step of a pretrain checkpoint, read lazily (mmap, weights only): None when it has none."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable here: the loader names the problem when it reads the file
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None
