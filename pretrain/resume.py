"""The output directory of pretrain.main: one run at a time, never another tool's, resumed only with the same
configuration (the knob table's resume column says what may differ), and no export ever overwritten.
"""
import json
import logging
import os
import subprocess
import sys

import torch

import models

from common.checkpoint import remove_orphan_temps, set_aside
from common.config import config_drift
from common.dist import DistInfo, broadcast_object
from common.errors import ConfigError, UserError
from common.log import write_json
from common.rundir import claim_run_dir
from . import shards
from . import state as ckpt_state
from .engine import NO_CHECKPOINT, StopTraining
from .config import canonical_summary_index, default_of, expand, freeze, resume_changes
from .students import student_specs

log = logging.getLogger("pretrain")

RUN_FILES = ("config.json", "checkpoint.pth", "log.txt", "student_backbone.pth")  # what a run writes at its top
# Per-student knobs are compared by student (student_diff): the field of a StudentSpec -> its knob
STUDENT_FIELDS = {"arch": "student", "kwargs": "student_kwargs", "drop_path": "drop_path", "lr": "lr"}
# The per-process batch and --global-batch-size are compared as the global batch they give
BATCH_KNOBS = ("batch_size", "global_batch_size")
PATH_KEYS = ("data_path", "teacher_checkpoint", "single_image")


def claim_output_dir(cfg, info: DistInfo) -> None:
    """Rank 0 checks that no other tool owns the output dir, locks it (common.rundir: held until the entry
    point returns) and removes temp files of killed saves.

    Every rank learns the outcome, so a refused run stops on all ranks with the same message.
    """
    error = ""
    if info.is_main:
        try:
            claim_run_dir(cfg["output_dir"], "pretrain", files=RUN_FILES, lock=True)
            remove_orphan_temps(cfg["output_dir"])
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise UserError(error)


def find_checkpoint(cfg, info: DistInfo):
    """(checkpoint, path) to resume from, or (None, None). Rank 0 picks the file (unusable ones are moved
    aside, never deleted), every rank loads that same file."""
    ckpt, path = None, None
    if info.is_main:
        ckpt, path = ckpt_state.load_resume_checkpoint(cfg["output_dir"], cfg["keep_checkpoints"])
    path = broadcast_object(path)
    if path and not info.is_main:
        ckpt = ckpt_state.read_checkpoint(path)
    return ckpt, path


def prepare_fresh_start(cfg, info: DistInfo) -> None:
    """No usable checkpoint: refuse to overwrite a finished run's exports; set an old log.txt aside."""
    out = cfg["output_dir"]
    names = ("student_backbone.pth", "student_backbone_ema.pth")
    folders = [""] + ([s["key"] for s in cfg["students"]] if len(cfg["students"]) > 1 else [])
    exports = [os.path.join(f, n) for f in folders for n in names if os.path.exists(os.path.join(out, f, n))]
    if exports:
        raise ConfigError(f"{out} holds a finished run's {', '.join(exports)} but no usable checkpoint to resume "
                          f"from (see the warnings above); starting again would overwrite them. Use a new "
                          f"--output-dir, or move the exports away to train from scratch here")
    log_txt = os.path.join(out, "log.txt")
    if info.is_main and os.path.isfile(log_txt) and os.path.getsize(log_txt):
        set_aside(log_txt, "previous", "starting from scratch: its steps would repeat in the new log")


def keep_recorded_workers(cfg, ckpt: dict | None):
    """Tar shards: the loader's worker count defines the sample order. With --num-workers auto a resume takes the
    count the checkpoint's run resolved (the node may have other CPUs now, e.g. another SLURM allocation); an
    explicit count is compared as given (check_config refuses another one). Returns the configuration to use."""
    recorded = ((ckpt or {}).get("config") or {}).get("num_workers")
    if (cfg.get("num_workers_requested") != "auto" or not isinstance(recorded, int) or isinstance(recorded, bool)
            or recorded == cfg["num_workers"] or not any(shards.is_shard_spec(p) for p in cfg["data_path"])):
        return cfg
    log.info("--num-workers auto: resuming with the checkpoint's %d DataLoader workers per rank (auto gives %d on "
             "this node): with tar shards the worker count defines the sample order", recorded, cfg["num_workers"])
    return freeze({**cfg, "num_workers": recorded})


def check_config(cfg, table, ckpt: dict | None, path: str | None) -> list:
    """Refuse to resume with a configuration that differs from the checkpoint's, except for the keys named in
    --allow-resume-change. Returns the run's history of allowed changes (`resume_changes`)."""
    if ckpt is None:
        return []
    old = ckpt.get("config") or {}
    diffs = config_diff(old, cfg, table)
    allowed = resume_changes(cfg["allow_resume_change"], table)
    if "teacher_checkpoint" in allowed:
        allowed.add("teacher_fingerprint")  # a replaced teacher file is a teacher change
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        changeable = sorted({"teacher_checkpoint" if k == "teacher_fingerprint" else k for k in refused}
                            & {k.name for k in expand(table) if k.resume == "changeable"})
        hint = (f" If the change is intended, pass --allow-resume-change {','.join(changeable)}." if changeable
                else "")
        if "num_workers" in refused:
            hint += (f" With tar shards the worker count defines the sample order: pass --num-workers "
                     f"{refused['num_workers'][0]} or auto (which resumes with the checkpoint's count).")
        raise ConfigError(f"{cfg['output_dir']} holds a run with a different configuration ({path}, step "
                          f"{ckpt.get('global_step')}):\n{lines}\nRerun with the checkpoint's values or use a new "
                          f"--output-dir.{hint}")
    if old.get("precision") and old["precision"] != cfg["precision"] and "precision" not in diffs:
        log.warning("precision resolved to %s here (%s); the checkpoint was trained with %s", cfg["precision"],
                    cfg["precision_reason"], old["precision"])
    done = ckpt.get("global_step", 0)
    added = [k for k in (s["key"] for s in cfg["students"]) if k not in ckpt_state.student_states(ckpt)]
    if added and cfg["epochs"] * (old.get("steps_per_epoch") or 1) <= done:
        raise ConfigError(f"student(s) {', '.join(added)} would join {path} at step {done}, its last step, and train "
                          f"for none: extend the run as well (--epochs N --allow-resume-change student,epochs)")
    if "epochs" in diffs and cfg["epochs"] * (old.get("steps_per_epoch") or 1) < done:
        raise ConfigError(f"--epochs {cfg['epochs']} is shorter than what {path} has already trained ({done} steps, "
                          f"{ckpt.get('epoch')} epochs): extending a run is allowed, shortening it is not; use its "
                          f"exports or a checkpoint as they are")
    history = list(old.get("resume_changes", []))
    if diffs:
        log.warning("resuming with changed %s (allowed by --allow-resume-change; schedule rebuilt from the new "
                    "values)", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items()))
        history.append({"step": ckpt.get("global_step"), "changes": {k: list(v) for k, v in diffs.items()}})
    return history


def config_diff(old: dict, new, table) -> dict:
    """{knob: (old, new)} over every result-changing knob (the table's must-match and changeable rows, the
    per-student ones by student), paths made absolute."""
    keys = [k.name for k in expand(table) if k.resume != "free" and not k.student and k.name not in BATCH_KNOBS]
    keys.append("global_batch")
    if any(shards.is_shard_spec(p) for p in new["data_path"]):
        keys.append("num_workers")  # tar shards: the loader's workers define the sample order
    keys.append("teacher_fingerprint")  # the same path holding other weights is another teacher
    # --precision auto is compared as asked, not as resolved on this machine (see check_config's warning)
    old, new = ({**c, "precision": c.get("precision_requested")} for c in (old, new))
    drift = config_drift(old, new, keys, default=lambda k: default_of(table, k), normalise=_normalise)
    return {**drift, **student_diff(old, new, table)}


def _normalise(key: str, value):
    if key == "teacher_summary_index":
        return canonical_summary_index(value)
    if key in PATH_KEYS:
        if isinstance(value, (list, tuple)):
            return [os.path.abspath(v) for v in value]
        return os.path.abspath(value) if value else ""
    return list(value) if isinstance(value, tuple) else value


def recorded_specs(old: dict, table) -> list:
    """The students a checkpoint's configuration names."""
    return student_specs({k.name: old.get(k.name, k.default) for k in expand(table) if k.student})


def student_diff(old: dict, new, table) -> dict:
    """Student changes by flag: `student` when students were added or dropped ({key: arch} before and now);
    for every student in both, a changed architecture, kwargs, drop path or lr under that knob's name."""
    before = {s.key: s for s in recorded_specs(old, table)}
    now = {s.key: s for s in student_specs(new)}
    out = {}
    if list(before) != list(now):
        out["student"] = ({k: s.arch for k, s in before.items()}, {k: s.arch for k, s in now.items()})
    for field, knob in STUDENT_FIELDS.items():
        changed = {k: (getattr(before[k], field), getattr(now[k], field)) for k in before if k in now
                   and getattr(before[k], field) != getattr(now[k], field)}
        if changed:
            if len(now) == 1 and len(before) == 1:
                out[knob] = next(iter(changed.values()))
            else:
                out[knob] = ({k: a for k, (a, _) in changed.items()}, {k: b for k, (_, b) in changed.items()})
    return out


def check_steps_per_epoch(ckpt: dict | None, steps_per_epoch: int) -> None:
    """A resumed epoch continues at a batch offset: the data must give the same number of batches."""
    old = (ckpt or {}).get("config", {}).get("steps_per_epoch")
    if old is not None and old != steps_per_epoch:
        raise ConfigError(f"the data now gives {steps_per_epoch} steps per epoch, the checkpoint's run had {old} "
                          f"(images added or removed under --data-path?): a resume would replay or skip images. "
                          f"Restore the data or use a new --output-dir")


def restore(trainer, ckpt: dict | None, path: str | None, table, info: DistInfo, build_schedule) -> None:
    """Load the checkpoint into the trainer; exports the continuing run would overwrite are set aside first,
    and dropped students are exported. Students that join now get a schedule over the steps they have left."""
    if ckpt is None:
        log.info("no checkpoint in %s: starting from scratch", trainer.cfg["output_dir"])
        return
    set_aside_stale_exports(trainer, ckpt, info)
    export_dropped_students(trainer, ckpt, table, info)
    trainer.progress = ckpt_state.restore(ckpt, trainer.students, trainer.mask_gen, info.rank, info.world_size,
                                          trainer.normaliser)
    for run in trainer.students:
        if run.start_step:  # joined later: its warm-up and cosine span the steps it has left
            run.scheduler = build_schedule(trainer.cfg, run.optimizer, trainer.steps_per_epoch, run.start_step)
    trainer.last_good = f"{path} (step {trainer.progress.global_step})"
    p = trainer.progress
    log.info("resumed from %s: epoch %d, batch %d/%d, step %d", path, p.epoch, p.step_in_epoch,
             trainer.steps_per_epoch, p.global_step)


def set_aside_stale_exports(trainer, ckpt: dict, info: DistInfo) -> None:
    """Exports that the continuing run would leave stale or overwrite are renamed, never deleted: the top-level
    exports when one student becomes several, a kept student's own folder when several become one, and the
    folder of an earlier (dropped) student whose key an added student takes."""
    if not info.is_main:
        return
    out, saved = trainer.cfg["output_dir"], ckpt_state.student_states(ckpt)
    was_multi = isinstance(ckpt.get("students"), dict)
    stale = []
    if trainer.multi and not was_multi:
        stale += [os.path.join(out, n) for n in ("student_backbone.pth", "student_backbone_ema.pth")]
    for run in trainer.students:
        if run.key not in saved or (was_multi and not trainer.multi):
            stale.append(os.path.join(out, run.key))
    for path in stale:
        if os.path.exists(path):
            set_aside(path, f"before-step{ckpt['global_step']}", "exports of an earlier layout or student of this "
                                                                 "run, which the continuing run would overwrite")


def export_dropped_students(trainer, ckpt: dict, table, info: DistInfo) -> None:
    """A student dropped on resume (--allow-resume-change student) loses nothing: its weights at the checkpoint
    are exported to OUTPUT/<key>/ as a finished run's would be."""
    kept = {run.key for run in trainer.students}
    old_cfg = ckpt.get("config") or {}
    old_specs = {s.key: s for s in recorded_specs(old_cfg, table)}
    for key, state in ckpt_state.student_states(ckpt).items():
        if key in kept or not info.is_main:
            continue
        folder = os.path.join(trainer.cfg["output_dir"], key)
        if os.path.exists(folder):  # an export of an earlier stage of this student: kept, under another name
            set_aside(folder, f"before-step{ckpt['global_step']}", "its exports are replaced by the dropped "
                                                                 "student's weights at the checkpoint")
        os.makedirs(folder)
        spec = old_specs.get(key)
        paths = ckpt_state.export_saved_student(state, spec.arch if spec else "", folder)
        write_json(os.path.join(folder, "config.json"), student_view(old_cfg, spec, dropped_at=ckpt["global_step"]))
        log.warning("student %s dropped at step %d: its weights there are exported to %s", key,
                    ckpt["global_step"], ", ".join(paths))


def student_view(cfg, spec, **extra) -> dict:
    """The configuration as a one-student run of `spec` would record it: what tools.export, the evaluations
    and models.load_backbone read from a config.json beside the weights."""
    view = {k: v for k, v in cfg.items() if k not in ("students", "student_lr", "student_drop_path")}
    if spec is not None:
        view.update(student=spec.arch, student_kwargs=spec.kwargs, drop_path=spec.drop_path, lr=spec.lr,
                    student_key=spec.key)
        own = next((s for s in cfg.get("students") or [] if s.get("key") == spec.key), None)
        if own is not None and "lr_scaled" in own:  # its own peak lr (--student-lr), not the run's
            view["lr_scaled"] = own["lr_scaled"]
    return {**view, **extra, "tool": "pretrain"}


def write_run_config(cfg, info: DistInfo, resumed_from: str | None) -> None:
    """config.json: the resolved configuration, the code and the command that ran."""
    if not info.is_main:
        return
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    write_json(os.path.join(cfg["output_dir"], "config.json"),
               {**cfg, "total_steps": cfg["steps_per_epoch"] * cfg["epochs"], "resumed_from": resumed_from,
                "git_sha": sha, "torch": torch.__version__, "argv": sys.argv})
    log.info("config: %s", json.dumps({k: cfg[k] for k in ("teacher", "student", "global_batch", "lr_scaled",
                                                             "epochs", "precision", "objectives")}))
    if len(cfg["students"]) > 1:
        log.info("students: %s", json.dumps(cfg["students"]))


def export_students(trainer, cfg, info: DistInfo) -> None:
    """Export every student: at the top of OUTPUT for one, in OUTPUT/<key>/ (with its config.json) for several."""
    if not info.is_main:
        return
    for r in trainer.students:
        folder = os.path.join(cfg["output_dir"], r.key) if trainer.multi else cfg["output_dir"]
        try:
            os.makedirs(folder, exist_ok=True)
            paths = ckpt_state.export_backbones(r, folder)
            if trainer.multi:
                write_json(os.path.join(folder, "config.json"), student_view(cfg, r.spec))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            where = (f"The checkpoint ({trainer.last_good}) holds the weights: free space and rerun the same command "
                     f"to export." if trainer.last_good != NO_CHECKPOINT else "No checkpoint was written either (see "
                     "the errors above): the weights are lost. Free space and rerun.")
            raise StopTraining(f"training finished but the backbone export of {r.key} failed: {e}. {where}",
                               ckpt_state.EXIT_SAVE_FAILED) from e
        timm_name = r.spec.arch[len("timm:"):]
        how = (f"timm keys: timm.create_model('{timm_name}', num_classes=0, pretrained=True, pretrained_cfg_overlay="
               f"dict(file=...))" if models.is_timm_name(r.spec.arch) else "DINOv2 keys; models.load_backbone or timm "
               "vit_*_patch14_dinov2")
        log.info("exported %s (%s)", ", ".join(paths), how)
