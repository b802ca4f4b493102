"""pretrain.main's configuration: the knob row type, what the knob table generates (the argparse flags, the
range and choice checks), the validation that is not a range or a choice, and the derived quantities.

Validation raises ConfigError (or MissingFileError) where the problem is found; it runs before anything
heavy (no model, no dataset), so a bad command line costs nothing and leaves no files behind.
"""
import argparse
import logging
import math
import os
import re
import types
from dataclasses import dataclass, replace

import torch

import models
from common import data as cdata
from common import optim
from common.checkpoint import quick_fingerprint
from common.config import ConfigArgumentParser
from common.dist import DistInfo, resolve_device
from common.errors import ConfigError, MissingFileError, UserError
from common.precision import resolve_precision
from . import accumulate, monitor, pipeline, preflight, shards
from .losses import OBJECTIVES, select_objectives
from .masking import validate_mask_config
from .students import student_specs

log = logging.getLogger("pretrain")

RESUME_POLICIES = ("free", "changeable", "must-match")


@dataclass(frozen=True)
class Knob:
    """One row of the knob table: a flag --name-with-dashes (and `name:` in a -c config file).

    ge/gt/le/lt: the allowed range (inclusive / exclusive bounds; none = unbounded). resume: "free" (never
    changes results), "changeable" (a resume may change it when named in --allow-resume-change), or
    "must-match". student: compared per student on resume (pretrain/students.py) instead of as a flag.
    """
    name: str
    default: object
    help: str
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    resume: str = "must-match"
    student: bool = False
    aliases: tuple = ()
    group: str = ""
    parse: object = None  # the flag's argparse type when it is not the default's type (--min-lr: number or auto)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))


OBJECTIVE_WEIGHTS = Knob("lambda_<objective>", 0.0, "one --lambda-<name> per entry of pretrain/losses.py OBJECTIVES")


def knob_table(*rows) -> tuple:
    """The table as written: a string starts a group; OBJECTIVE_WEIGHTS stands for the objectives' weights."""
    out, group = [], ""
    for row in rows:
        if isinstance(row, str):
            group = row
            continue
        assert row.resume in RESUME_POLICIES, row
        out.append(replace(row, group=group))
    return tuple(out)


def expand(table) -> list[Knob]:
    """The table with OBJECTIVE_WEIGHTS replaced by one --lambda-<name> knob per registered objective."""
    out = []
    for knob in table:
        if knob.name == OBJECTIVE_WEIGHTS.name:
            out += [Knob(f"lambda_{o.name}", o.default_lambda, o.help, ge=0, group=knob.group)
                    for o in OBJECTIVES.values()]
        else:
            out.append(knob)
    return out


def default_of(table, key: str):
    return next((k.default for k in expand(table) if k.name == key), None)


def build_parser(table, prog: str, description: str) -> ConfigArgumentParser:
    parser = ConfigArgumentParser(prog, description=description,  # -c/--config FILE
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for k in expand(table):
        g = groups.get(k.group) or groups.setdefault(k.group, parser.add_argument_group(k.group))
        flags = [k.flag, *k.aliases]
        if isinstance(k.default, bool):
            g.add_argument(*flags, default=k.default, action=argparse.BooleanOptionalAction, help=k.help)
        elif isinstance(k.default, list):
            g.add_argument(*flags, default=k.default, nargs="+", type=type(k.default[0]), help=k.help)
        else:
            g.add_argument(*flags, default=k.default, type=k.parse or type(k.default), choices=k.choices or None,
                           help=k.help)
    return parser


def check_ranges(cfg: dict, table) -> None:
    """Each numeric knob within its range (and finite)."""
    for k in expand(table):
        if not k.bounded:
            continue
        v = cfg[k.name]
        if isinstance(v, str):  # a word the knob's parse accepts besides numbers ("auto")
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{k.flag} must be a finite number, got {v}")
        lo, hi = (k.ge if k.gt is None else k.gt), (k.le if k.lt is None else k.lt)
        if (k.ge is not None and v < k.ge) or (k.gt is not None and v <= k.gt) or \
                (k.le is not None and v > k.le) or (k.lt is not None and v >= k.lt):
            span = f"{'(' if k.gt is not None else '['}{lo}, {hi if hi is not None else 'inf'}" \
                   f"{')' if k.lt is not None else ']'}"
            raise ConfigError(f"{k.flag} must be in {span}, got {v}")


def freeze(cfg: dict) -> types.MappingProxyType:
    """The resolved configuration, read-only: builders return values, they never write into it."""
    return types.MappingProxyType(dict(cfg))


# ---- validation beyond ranges and choices ---------------------------------------------------------------
def validate_config(cfg: dict, table, world_size: int) -> None:
    """Every configuration error we can detect without loading a model or a dataset (ConfigError)."""
    check_ranges(cfg, table)
    check_students(cfg, world_size)
    teachers = teacher_list(cfg)
    validate_mask_config(cfg["mask_probability"], cfg["mask_ratio"])
    for t in teachers:
        check_teacher(t, cfg)
        spec = models.teacher_spec(t["name"])
        objectives_of(cfg, spec.patch_targets if spec is not None else True)
    check_optimisation(cfg, world_size)
    check_augmentation(cfg)
    resume_changes(cfg["allow_resume_change"], table)
    monitor.check_wandb(cfg["wandb"])
    monitor.parse_knn_dirs(cfg["monitor_knn"])
    resolve_device(cfg["device"])  # --device cuda without a GPU fails here, not after the teacher
    if cfg["single_image"]:
        if not os.path.isfile(cfg["single_image"]):
            raise MissingFileError(f"--single-image {cfg['single_image']!r} does not exist")
        try:
            cdata.load_rgb(cfg["single_image"])
        except cdata.BAD_IMAGE_ERRORS as e:
            raise ConfigError(f"--single-image {cfg['single_image']!r} is not a readable image: {e}") from e
    else:
        check_data_sources(cfg)
    check_output_dir(cfg)  # every data mode
    for t in teachers:
        if t["checkpoint"] and not os.path.isfile(t["checkpoint"]):
            raise MissingFileError(f"--teacher-checkpoint {t['checkpoint']!r} (teacher {t['name']}) does not exist")


def parse_student_kwargs(text: str) -> dict:
    """'depth=2,embed_dim=64' or the JSON the evaluation entry points take ('{"depth": 2}') -> dict of ints."""
    return models.parse_size_kwargs(text, "--student-kwargs")


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")] if text.strip() else []


def teacher_list(cfg) -> list[dict]:
    """[{name, checkpoint, weight, summary_index}] in --teacher order, from the comma lists."""
    names = split_list(cfg["teacher"])
    ckpts = split_list(cfg["teacher_checkpoint"])
    weights = split_list(cfg["teacher_weight"]) or ["1"] * len(names)
    if not names or len(set(names)) != len(names) or "" in names:
        raise ConfigError(f"--teacher takes distinct comma-separated names, got {cfg['teacher']!r}")
    if len(ckpts) > len(names):
        raise ConfigError(f"--teacher-checkpoint has {len(ckpts)} entries for {len(names)} teacher(s); give one "
                          f"per teacher, in order (an empty entry means the default download)")
    if len(weights) != len(names):
        raise ConfigError(f"--teacher-weight has {len(weights)} values for {len(names)} teacher(s)")
    try:
        values = [float(w) for w in weights]
    except ValueError as e:
        raise ConfigError(f"--teacher-weight takes numbers, got {cfg['teacher_weight']!r}") from e
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise ConfigError(f"--teacher-weight values must be finite and > 0, got {values}")
    ckpts += [""] * (len(names) - len(ckpts))
    summaries = summary_indices(cfg["teacher_summary_index"], len(names))
    return [dict(name=n, checkpoint=c, weight=w, summary_index=i)
            for n, c, w, i in zip(names, ckpts, values, summaries)]


def _summary_choice(entries: list[str]) -> list[int | None] | None:
    """--teacher-summary-index entries -> None per 'all' (or empty) entry, else the index; None if any entry is
    neither. ASCII digits only: isdigit() also accepts '²', which int() refuses."""
    if not all(e in ("", "all") or (e.isascii() and e.isdecimal()) for e in entries):
        return None
    return [None if e in ("", "all") else int(e) for e in entries]


def summary_indices(text: str, n: int) -> list[int | None]:
    """--teacher-summary-index: 'all' (every teacher's default summary) or one entry per teacher, each 'all' (or
    empty) or the index of one summary token (C-RADIO: the position in its file's summary_idxs). None = all."""
    entries = split_list(text)
    if entries in ([], ["all"]):
        return [None] * n
    if len(entries) != n:
        raise ConfigError(f"--teacher-summary-index has {len(entries)} entries for {n} teacher(s); give 'all' or "
                          f"one per teacher, in order")
    choice = _summary_choice(entries)
    if choice is None:
        raise ConfigError(f"--teacher-summary-index takes all or a summary-token index >= 0 per teacher, got {text!r}")
    return choice


def canonical_summary_index(text):
    """--teacher-summary-index as compared on resume: 'all', 'all,all' and ',' are one choice, '01' is '1'."""
    choice = _summary_choice(split_list(text)) if isinstance(text, str) else None
    if choice is None:
        return text  # not a value this version writes: compared as it is
    if all(i is None for i in choice):
        return "all"
    return ",".join("all" if i is None else str(i) for i in choice)


def check_teacher(t: dict, cfg: dict) -> None:
    name = t["name"]
    if models.is_timm_name(name):
        import timm

        if not timm.is_model(name[len("timm:"):]):
            raise ConfigError(f"--teacher {name}: timm has no model of that name (see timm.list_models())")
        try:
            preflight.check_timm_teacher(name, cfg["input_size"])  # a ViT that runs at this size (meta device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    spec = models.teacher_spec(name)  # a row of models.TEACHER_FAMILIES (ConfigError for an unknown name)
    index = t.get("summary_index")  # tools.benchmark checks a bare {name}
    try:
        models.check_summary_index(name, index)
    except ConfigError as e:
        raise ConfigError(f"--teacher-summary-index {index}: {e}") from None
    if spec is not None and cfg["input_size"] % spec.patch_size:
        raise ConfigError(f"--input-size {cfg['input_size']} is not a multiple of teacher {name}'s patch size "
                          f"{spec.patch_size}")


def lambdas_of(cfg) -> dict:
    return {name: cfg[f"lambda_{name}"] for name in OBJECTIVES}


def objectives_of(cfg, patch_targets: bool) -> tuple[str, ...]:
    return select_objectives(patch_targets, lambdas_of(cfg), cfg["mask_probability"])


def check_data_sources(cfg: dict) -> None:
    """Each --data-path is an ImageFolder, a flat folder, a list file, or (alone) a tar-shard pattern."""
    sharded = any(shards.is_shard_spec(p) for p in cfg["data_path"])
    if sharded and (len(cfg["data_path"]) != 1 or cfg["class_fraction"] != 1.0 or cfg["images_per_class"]):
        raise ConfigError("tar shards take one --data-path pattern and no --class-fraction / --images-per-class "
                          "(make a proxy subset when writing the shards)")
    try:  # the layout checks of common.data and shards speak plain ValueError / FileNotFoundError (shared)
        if sharded:
            shards.check_shards(cfg["data_path"][0])
        for root in [] if sharded else cfg["data_path"]:
            cdata.pretrain_source_kind(root)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, UserError):
            raise
        raise (MissingFileError if isinstance(e, FileNotFoundError) else ConfigError)(str(e)) from e


def check_optimisation(cfg: dict, world_size: int) -> None:
    accumulate.plan_batches(cfg["batch_size"], cfg["global_batch_size"], world_size)  # divides, or the fix
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise ConfigError(f"need 0 <= --warmup-epochs <= --epochs, got {cfg['warmup_epochs']} / {cfg['epochs']}")
    betas = cfg["opt_betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"--opt-betas takes two values in [0, 1), got {betas}")
    lo_hi = cfg["crop_scale"]
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"--crop-scale takes LO HI with 0 < LO <= HI <= 1 (share of the image area), got {lo_hi}")


def check_students(cfg: dict, world_size: int) -> None:
    """Every --student entry, and each one's peak learning rate against --min-lr."""
    specs = student_specs(cfg)
    global_batch = accumulate.plan_batches(cfg["batch_size"], cfg["global_batch_size"], world_size).global_batch
    min_lr = min_lr_of(cfg, global_batch)
    for spec in specs:
        try:
            check_student({**cfg, "student": spec.arch, "student_kwargs": spec.kwargs})
        except ConfigError as e:  # several students: which one
            raise ConfigError(f"student {spec.key}: {e}" if len(specs) > 1 else str(e)) from e
        if spec.drop_path >= 1:
            raise ConfigError(f"--student-drop-path must be in [0, 1), got {spec.drop_path} for {spec.key}")
        peak = optim.scaled_lr(spec.lr, global_batch, cfg["lr_reference_batch"])
        if not peak > 0:
            raise ConfigError(f"--student-lr must be > 0, got {spec.lr} for {spec.key}")
        if min_lr > peak:
            what = (f"--min-lr {cfg['min_lr']}" if cfg["min_lr"] != "auto" else
                    f"--min-lr auto ({min_lr:.3g} = {accumulate.MIN_LR_AT_REFERENCE} x global batch / "
                    f"--lr-reference-batch)")
            raise ConfigError(f"{what} is above the peak learning rate {peak:.3g} of student "
                              f"{spec.key} (lr {spec.lr} x global batch {global_batch} / --lr-reference-batch "
                              f"{cfg['lr_reference_batch']})")


def float_or_auto(text: str):
    """argparse type of --min-lr: a number, or the word auto."""
    return "auto" if text == "auto" else float(text)


def min_lr_of(cfg, global_batch: int) -> float:
    """--min-lr as given, or its batch-scaled default (pretrain/accumulate.py default_min_lr), never above the
    lowest student's peak lr: a default must not refuse a small --lr."""
    if cfg["min_lr"] == "auto":
        peaks = [optim.scaled_lr(s.lr, global_batch, cfg["lr_reference_batch"]) for s in student_specs(cfg)]
        return min([accumulate.default_min_lr(global_batch, cfg["lr_reference_batch"]), *peaks])
    return cfg["min_lr"]


def check_student(cfg: dict) -> None:
    name, kwargs = cfg["student"], parse_student_kwargs(cfg["student_kwargs"])
    if models.is_timm_name(name):
        import timm

        if not timm.is_model(name[len("timm:"):]):
            raise ConfigError(f"--student {name}: timm has no model of that name (see timm.list_models())")
        check_timm_kwargs(name, kwargs, cfg["input_size"])
        return
    if name not in models.STUDENTS:
        raise ConfigError(f"unknown student {name!r}; expected one of {models.STUDENTS} or timm:<name>")
    size, p = cfg["input_size"], cfg["patch_size"]
    if size % p:
        raise ConfigError(f"--patch-size {p} does not divide --input-size {size}; pick a multiple, e.g. "
                         f"--input-size {max(p, size // p * p)}")
    check_student_kwargs(kwargs, name)


def check_timm_kwargs(name: str, kwargs: dict, input_size: int) -> None:
    """A timm student's keyword arguments are timm's, and the model runs at this size: built on the meta device
    (no memory, no init) and run once (pretrain/preflight.py), so that it fails here, not after the teacher loaded."""
    try:
        preflight.check_timm_student(name, kwargs, input_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_student_kwargs(kwargs: dict, student: str) -> None:
    allowed = ("depth", "embed_dim", "num_heads", "num_register_tokens")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"--student-kwargs: unknown key(s) {unknown}; allowed: {list(allowed)}")
    low = {k: v for k, v in kwargs.items() if v < (0 if k == "num_register_tokens" else 1)}
    if low:
        raise ConfigError(f"--student-kwargs values must be >= 1 (num_register_tokens >= 0), got {low}")
    dim, _, heads = models.VIT_SIZES[student]
    dim, heads = kwargs.get("embed_dim", dim), kwargs.get("num_heads", heads)
    if dim % heads:
        raise ConfigError(f"--student-kwargs: embed_dim {dim} is not divisible by num_heads {heads}")


RAND_AUGMENT_SECTION = r"(m|n|mstd|mmax|inc|p)[0-9.]+|t\w+"  # timm's rand-* keys (others are silently skipped)


def check_augmentation(cfg: dict) -> None:
    """Build the training transform once: timm rejects unknown RandAugment policies here, not in a worker."""
    aa = cfg["aa"]
    if aa.startswith("rand") and not all(re.fullmatch(RAND_AUGMENT_SECTION, sec) for sec in aa.split("-")[1:]):
        raise ConfigError(f"--aa {aa!r} is not a timm augmentation policy such as rand-m9-mstd0.5-inc1: its sections "
                          f"after 'rand' must be m<int>, n<int>, mstd<float>, mmax<int>, inc<0|1> or p<float>")
    try:
        cdata.build_train_transform(cfg["input_size"], cfg["aa"] or None, cfg["reprob"], cfg["train_interpolation"],
                                    scale=cfg["crop_scale"])
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ConfigError(f"--aa {cfg['aa']!r} is not a timm augmentation policy such as rand-m9-mstd0.5-inc1 "
                          f"(or '' for none): {type(e).__name__}: {e}") from e


def check_output_dir(cfg: dict) -> None:
    """The run must not write into its own data (every folder under an ImageFolder root is a class), and
    every student's export folder OUTPUT/<key> must be a folder or free."""
    specs = student_specs(cfg)
    for spec in specs if len(specs) > 1 else ():
        folder = os.path.join(cfg["output_dir"], spec.key)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{folder} is a file, but student {spec.key} exports into that folder at the end; "
                              f"move the file away or use a new --output-dir")
    out = os.path.realpath(cfg["output_dir"])
    roots = [] if cfg["single_image"] else [p for p in cfg["data_path"] if os.path.isdir(p)]
    for root in roots:
        root = os.path.realpath(root)
        if out == root or out.startswith(root + os.sep):
            raise ConfigError(f"--output-dir {cfg['output_dir']!r} is inside --data-path {root!r}: the run would "
                              f"write into its own training data; choose an output dir outside it")


def resume_changes(text: str, table) -> set[str]:
    """The keys named in --allow-resume-change (each must be a changeable knob)."""
    changeable = [k.name for k in expand(table) if k.resume == "changeable"]
    keys = {k.strip().lstrip("-").replace("-", "_") for k in text.split(",") if k.strip()}
    bad = sorted(keys - set(changeable))
    if bad:
        raise ConfigError(f"--allow-resume-change: {bad} cannot change on resume; changeable: "
                          f"{', '.join(changeable)} (anything else needs a new --output-dir)")
    return keys


# ---- derived quantities ---------------------------------------------------------------------------------
def derive(cfg: dict, info: DistInfo) -> types.MappingProxyType:
    """Quantities computed from the knobs (printed and stored in config.json, never configured); frozen."""
    cfg = dict(cfg, tool="pretrain")
    teachers = teacher_list(cfg)
    # absolute: config.json must name the files it used
    cfg["teacher_checkpoint"] = ",".join(os.path.abspath(t["checkpoint"]) if t["checkpoint"] else "" for t in teachers)
    cfg["single_image"] = os.path.abspath(cfg["single_image"]) if cfg["single_image"] else ""
    # size + head/tail hash: every rank computes it at start, and teacher files are GBs (a replaced file changes it)
    cfg["teacher_fingerprint"] = ",".join(quick_fingerprint(t["checkpoint"]) if t["checkpoint"] else ""
                                          for t in teachers)
    cfg["data_path"] = [os.path.abspath(p) for p in cfg["data_path"]]
    # as asked and as resolved here: a shard run resumed on a node with other CPUs keeps its count (pretrain/resume.py)
    auto = isinstance(cfg["num_workers"], str) and cfg["num_workers"].strip() == "auto"
    cfg["num_workers_requested"] = "auto" if auto else int(cfg["num_workers"])
    cfg["num_workers"] = pipeline.resolve_num_workers(cfg["num_workers"])
    cfg["precision_requested"] = cfg["precision"]
    cfg["precision"], cfg["precision_reason"] = resolve_precision(cfg["precision"], info.device)
    log.info("precision %s (%s)", cfg["precision"], cfg["precision_reason"])
    plan = accumulate.plan_batches(cfg["batch_size"], cfg["global_batch_size"], info.world_size)
    cfg["batch_size"], cfg["accum_steps"] = plan.micro, plan.accum  # micro-batch; micro-batches per step
    cfg["world_size"] = info.world_size
    cfg["global_batch"] = plan.global_batch
    cfg["min_lr_requested"], cfg["min_lr"] = cfg["min_lr"], min_lr_of(cfg, plan.global_batch)
    log.info("%s", accumulate.describe(plan))
    cfg["lr_scaled"] = optim.scaled_lr(cfg["lr"], cfg["global_batch"], cfg["lr_reference_batch"])
    cfg["students"] = [{**spec.as_dict(), "lr_scaled": optim.scaled_lr(spec.lr, cfg["global_batch"],
                                                                       cfg["lr_reference_batch"])}
                       for spec in student_specs(cfg)]
    if len(cfg["students"]) == 1:  # its --student-lr, if any, is the run's lr
        cfg["lr_scaled"] = cfg["students"][0]["lr_scaled"]
    if cfg["teacher_norm"] == "auto":
        cfg["teacher_norm"] = "phi-s" if len(teachers) > 1 else "none"
    return freeze(cfg)


def teacher_weight_dtype(cfg, device: torch.device) -> torch.dtype:
    """auto: on GPU under bf16/fp16 a frozen teacher needs no fp32 master weights (bf16 halves its memory and
    bandwidth; the targets move by about 1 % relative); fp32 keeps the original's fp32 weights under autocast."""
    choice = cfg["teacher_dtype"]
    if choice == "bf16":
        return torch.bfloat16
    if choice == "auto" and device.type == "cuda" and cfg["precision"] != "fp32":
        # the autocast dtype itself: bf16 weights under fp16 autocast mix dtypes in the token concat
        return torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16
    return torch.float32
