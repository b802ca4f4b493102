"""What a pretraining checkpoint holds, and how it is written, restored and exported.

checkpoint.pth (plain types only, so `torch.load(weights_only=True)` reads it), one student:
    student, student_ema   DINOv2-format backbone state dicts (what `models.load_backbone` reads)
    heads                  head state dicts: token_head / fea_head / patch_head for one teacher,
                           "<teacher>/<objective>" for several
    optimizer, scheduler, scaler
several students (--student a,b): instead of those, `students` = {key: {the same six, start_step}}
and, whatever the number of students:
    target_norm            PHI-S statistics of every teacher (pretrain/targets.py), or None
    epoch, step_in_epoch, global_step   where to continue: `epoch` is the epoch in progress and
                           `step_in_epoch` how many of its batches are done (0 at an epoch boundary)
    rng                    per rank: torch CPU (+ CUDA) generator, numpy and Python `random` states
    mask_rng               per rank: the mask generator's state
    bad_images             images skipped so far
    config                 the resolved configuration (a dict)
The frozen teacher is *not* stored (the original stored it: +4.5 GB for a ViT-g teacher).
"""
import logging
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from common.checkpoint import atomic_save, load_checkpoint, load_latest, save_with_history
from common.dist import all_gather_object

log = logging.getLogger(__name__)

EXIT_SAVE_FAILED = 74  # EX_IOERR: checkpoints could not be written (disk full, quota, permissions)
REQUIRED_KEYS = ("global_step", "epoch", "step_in_epoch", "rng", "config")
STUDENT_KEYS = ("student", "heads", "optimizer")  # at the top level (one student) or per `students` entry


@dataclass
class Progress:
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # batches of that epoch already trained on
    global_step: int = 0  # optimizer steps so far
    bad_images: int = 0  # unreadable images skipped so far (all ranks)
    data_state: dict = field(default_factory=dict)  # tar shards: {loader role: raw samples read this epoch}


def seed_everything(seed: int) -> None:
    random.seed(seed)  # the original left Python's RNG unseeded (RandAugment draws from it)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Every RNG the data pipeline and model may draw from, as plain tensors / lists."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def student_state(run) -> dict:
    """What one student needs to continue: weights, heads, AdamW, schedule, scaler, EMA."""
    return {"student": run.distiller.student.state_dict(), "heads": run.distiller.head_state_dicts(),
            "student_ema": run.ema.module.state_dict() if run.ema is not None else None,
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None}


def build_checkpoint(students: list, progress: Progress, mask_gen, config: dict, normaliser=None) -> dict:
    """Collective (every rank calls it: RNG states are gathered); the result is only saved on rank 0.

    One student: its state at the top level (the single-run layout). Several: `students` {key: state,
    start_step}, in --student order.
    """
    extra = {"target_norm": normaliser.state_dict()} if normaliser is not None else {}  # one teacher: as before
    if len(students) == 1:
        extra.update(student_state(students[0]))
    else:
        extra["students"] = {run.key: {**student_state(run), "start_step": run.start_step} for run in students}
    return {**extra, **asdict(progress),
            "rng": all_gather_object(capture_rng()), "mask_rng": all_gather_object(mask_gen.state_dict()),
            "config": dict(config)}


def save_checkpoint(ckpt: dict, output_dir: str, keep_last: int, is_main: bool) -> tuple[str | None, str]:
    """Atomic save with history on rank 0: (path, "") or, when the write failed, (None, why).

    A failed write (a full disk raises RuntimeError inside torch.save, a quota OSError) leaves the previous
    checkpoint intact; the caller decides how many failures in a row it tolerates.
    """
    if not is_main:
        return None, ""
    try:
        return save_with_history(ckpt, output_dir, "checkpoint.pth", keep_last), ""
    except (OSError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error("checkpoint not written: %s. The previous checkpoint is intact.", why)
        return None, why


def is_resumable(ckpt) -> str | None:
    """None if `ckpt` is a pretrain.main checkpoint, else why not (used to set foreign files aside)."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a pretrain.main checkpoint"
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    several = ckpt.get("students")
    if isinstance(several, dict) and several:
        missing += sorted({k for state in several.values() for k in STUDENT_KEYS
                           if not isinstance(state, dict) or k not in state})
    else:
        missing += [k for k in STUDENT_KEYS if k not in ckpt]
    if missing:
        return f"not a pretrain.main checkpoint (no {', '.join(missing)})"
    return student_keys_problem(ckpt)


def student_keys_problem(ckpt: dict) -> str | None:
    """Why the checkpoint's students cannot be trusted, or None: every key must be a plain folder name (they
    become OUTPUT/<key>/) and the keys must be those its own configuration names, in that order."""
    from .students import safe_key, student_specs

    several = ckpt.get("students")
    if not isinstance(several, dict):
        return None
    bad = [k for k in several if not safe_key(k)]
    if bad:
        return f"its student keys {bad} are not plain folder names"
    try:
        named = [s.key for s in student_specs({"lr": 0.0, **ckpt["config"]})]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its configuration names no students ({e})"
    if named != list(several):
        return f"it holds the students {list(several)} but its configuration names {named}"
    return None


def student_states(ckpt: dict) -> dict:
    """{student key: its state} of a checkpoint in either layout (one student: keyed by its config's key)."""
    if isinstance(ckpt.get("students"), dict):
        return dict(ckpt["students"])
    from .students import student_specs

    key = student_specs({"lr": 0.0, **ckpt["config"]})[0].key
    return {key: {k: ckpt.get(k) for k in ("student", "heads", "student_ema", "optimizer", "scheduler", "scaler")}}


def load_resume_checkpoint(output_dir: str, keep_last: int):  # the one place naming the file for resume
    """(checkpoint, path) of the newest usable checkpoint in output_dir, or (None, None)."""
    return load_latest(output_dir, "checkpoint.pth", keep_last, accept=is_resumable)


def read_checkpoint(path: str) -> dict:
    return load_checkpoint(path)


def restore(ckpt: dict, students: list, mask_gen, rank: int, world_size: int, normaliser=None) -> Progress:
    """Load everything `build_checkpoint` stored; RNG streams only if the world size is unchanged.

    A student the checkpoint does not hold (added on resume, see pretrain.main) keeps its fresh state and
    joins at the checkpoint's step (`start_step`): its own warm-up and cosine run from there to the end.
    The LR schedule is not restored: it is a function of the configuration and the step, rebuilt from the
    current configuration (so an allowed change of --epochs or --lr takes effect, and an unchanged one
    gives exactly the saved schedule). The checkpoint's `scheduler` entry is kept for inspection.
    """
    saved = student_states(ckpt)
    for run in students:
        if run.key in saved:
            load_student(saved[run.key], run)
        else:
            run.start_step = ckpt["global_step"]
            log.warning("student %s is new in this run: it joins at step %d with its own warm-up", run.key,
                        run.start_step)
    if normaliser is not None:
        if not ckpt.get("target_norm"):
            raise ValueError("the checkpoint holds no teacher-normalisation statistics but this run uses "
                             "--teacher-norm phi-s; resume with the checkpoint's --teacher-norm or a new --output-dir")
        normaliser.load_state_dict(ckpt["target_norm"])
    if len(ckpt["rng"]) == world_size:
        restore_rng(ckpt["rng"][rank])
        mask_gen.load_state_dict(ckpt["mask_rng"][rank])
    else:
        log.warning("checkpoint written by %d processes, now %d: RNG streams are not restored, so data order "
                    "and masks continue correctly but augmentations differ from an uninterrupted run",
                    len(ckpt["rng"]), world_size)
    return Progress(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], ckpt.get("bad_images", 0),
                    dict(ckpt.get("data_state") or {}))


def load_student(state: dict, run) -> None:
    run.distiller.student.load_state_dict(state["student"])
    run.distiller.load_head_state_dicts(state["heads"])
    if run.ema is not None and state.get("student_ema") is not None:
        run.ema.module.load_state_dict(state["student_ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler.is_enabled() and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.start_step = int(state.get("start_step", 0))


def backbone_weights(student) -> dict:
    """What an export holds: the DINOv2-format state dict, or for a timm student the timm model's own one
    (so `timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...))` loads it)."""
    inner = getattr(student, "model", None)
    return (inner if getattr(student, "timm_name", None) else student).state_dict()


def export_backbones(run, output_dir: str) -> list[str]:
    """student_backbone.pth and student_backbone_ema.pth of one student in `output_dir`: flat state dicts
    (DINOv2 or timm keys; rank 0)."""
    return write_exports(backbone_weights(run.distiller.student),
                         backbone_weights(run.ema.module) if run.ema is not None else None, output_dir)


def export_saved_student(state: dict, arch: str, output_dir: str) -> list[str]:
    """The exports of a student from its checkpoint state (a student dropped on resume): as export_backbones."""
    from models import is_timm_name, timm_model_keys

    def flat(sd: dict) -> dict:  # the export holds the timm model's own keys, as backbone_weights gives them
        return timm_model_keys(sd) if is_timm_name(arch) else sd

    ema = state.get("student_ema")
    return write_exports(flat(state["student"]), flat(ema) if ema is not None else None, output_dir)


def write_exports(weights: dict, ema_weights: dict | None, output_dir: str) -> list[str]:
    """student_backbone.pth (+ student_backbone_ema.pth when there is an EMA) in `output_dir`, atomically."""
    import os

    paths = [os.path.join(output_dir, "student_backbone.pth")]
    atomic_save(weights, paths[0])
    if ema_weights is not None:
        paths.append(os.path.join(output_dir, "student_backbone_ema.pth"))
        atomic_save(ema_weights, paths[1])
    return paths
