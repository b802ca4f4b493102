"""Proteus pretraining: distil a frozen foundation model into a randomly initialised ViT on ImageNet-1K.

    torchrun --nproc_per_node=8 -m pretrain.main --data-path /data/imagenet/train --output-dir runs/s14
    python -m pretrain.main --help          # every knob below, with its default

Single process (CPU or one GPU) or torchrun (NCCL on GPU, gloo on CPU, multi-node from torchrun's env).
Running the same command again resumes from `--output-dir/checkpoint.pth` (mid-epoch, exactly).
Rerunning with a different configuration is refused (the differing keys are listed) unless the keys
are named in --allow-resume-change (e.g. `--epochs 400 --allow-resume-change epochs` extends a run).
Exit codes: 0 done, 2 bad input (one message; no checkpoint, config.json or log.txt written), 3 non-finite
loss, 74 checkpoints could not be written, 75 stopped by SIGTERM/SIGINT/SIGUSR1/SIGHUP after a checkpoint (rerun the same command).
"""
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys

import numpy as np
import torch

import models
from common import data as cdata
from common import optim
from common.checkpoint import remove_orphan_temps, set_aside
from common.config import ConfigArgumentParser
from common.dist import DistInfo, broadcast_object, cleanup, init_distributed, resolve_device
from common.errors import ConfigError, DataError, UserError, cli
from common.log import MetricLogger, setup_logging, write_json
from common.precision import resolve_precision
from common.rundir import claim_run_dir
from common.runlock import RunDirLock
from .engine import EXIT_PREEMPTED, PreemptionFlag, StopTraining, Trainer
from .losses import ProteusDistiller, TargetSpec, select_objectives
from .students import StudentRun, build_student_module, init_seed, seeded, student_specs
from .targets import TargetNormaliser, fit_normaliser, prepare_targets
from .masking import MaskGenerator, validate_mask_config
from . import shards
from . import state as ckpt_state

log = logging.getLogger("pretrain")

# ==========================================================================================================
# Configuration: every knob, its default (the paper's ViT-S recipe: S/14 <- DINOv2-B/14) and why.
# Each is a command-line flag: data_path -> --data-path. Source: spec §1.1-1.7 (original run_pretrain.sh).
# ==========================================================================================================
CONFIG = {
    "data": {
        "data_path": (["data/imagenet/train"], "ImageFolder root(s) ROOT/<class>/<img>, flat image folders, text "
                                                "files listing image paths (several are merged), or one tar-shard "
                                                "pattern 'DIR/shards-{000000..001281}.tar'"),
        "input_size": (224, "training crop size (the teacher sees the same crop)"),
        "batch_size": (128, "images per process per step (original: 128 x 4 GPUs = 512 global)"),
        "global_batch_size": (0, "if > 0: global batch, split over processes (must divide evenly)"),
        "num_workers": (10, "DataLoader worker processes per rank"),
        "pin_mem": (True, "pinned host memory for faster host-to-GPU copies"),
        "on_bad_image": ("skip", "unreadable images: skip (warn + count) or fail"),
        "max_image_pixels": (89_478_485, "larger images are bad images (decompression-bomb guard; PIL's limit)"),
        "repeated_aug": (3, "DeiT repeated augmentation under DDP: copies of each image per epoch (1 = off)"),
        "class_fraction": (1.0, "proxy data: keep this fraction of the classes (paper §5, Table 10)"),
        "images_per_class": (0.0, "proxy data: 0 = all, (0,1) = fraction, >= 1 = count per class"),
        "single_image": ("", "path of one image: the paper's ImageNet-Single (replaces --data-path)"),
        "single_image_length": (1_281_167, "augmented views of --single-image per epoch (ImageNet's size)"),
    },
    "augmentation": {
        "aa": ("rand-m9-mstd0.5-inc1", "timm RandAugment policy (DeiT); '' disables it (and enables ColorJitter)"),
        "reprob": (0.25, "random erasing probability (mode pixel, 1 region)"),
        "train_interpolation": ("bicubic", "RandomResizedCrop / RandAugment interpolation"),
        "crop_scale": ([0.08, 1.0], "RandomResizedCrop area range LO HI (DeiT: 0.08 1; small images want more)"),
    },
    "models": {
        "teacher": ("dinov2_vitb14", f"frozen teacher(s), comma-separated: {', '.join(models.TEACHERS)} or "
                                     f"timm:<name>"),
        "teacher_checkpoint": ("", "teacher weights in the official format, comma-separated in --teacher's order "
                                   "(DINOv2: downloaded if empty)"),
        "teacher_weight": ("", "per-teacher loss weights, comma-separated (empty: 1 each)"),
        "teacher_norm": ("auto", "per-teacher target normalisation: phi-s (PHI-S, RADIO), none, or auto "
                                 "(phi-s with several teachers, none with one)"),
        "teacher_norm_batches": (8, "training batches that estimate the PHI-S statistics at the start"),
        "teacher_dtype": ("auto", "teacher weights: auto (on GPU the autocast dtype, bf16 or fp16; else fp32), "
                                  "fp32 (the original), bf16"),
        "student": ("vit_small", "student(s), comma-separated: vit_tiny, vit_small, vit_base, vit_large (DINOv2 ViT) "
                                 "or timm:<name> (any timm model, random init); several train jointly on one "
                                 "teacher pass, each exported to OUTPUT/<student>/"),
        "student_kwargs": ("", "size overrides: depth=2,embed_dim=64,num_heads=2 or JSON as --model-kwargs of the "
                               "evals; several students: one entry each, separated by ';' (one entry: all)"),
        "student_lr": ("", "per-student base lr overrides, comma-separated in --student order (empty entry: --lr); "
                           "the linear scaling rule applies to each"),
        "student_drop_path": ("", "per-student stochastic depth, comma-separated (empty entry: --drop-path)"),
        "patch_size": (14, "ViT student patch size (its grid is the distillation grid; teachers on another grid "
                           "are resampled to it)"),
        "drop_path": (0.0, "student stochastic depth (original: flag 0.1 but never applied, so 0)"),
    },
    "objective": {
        "mask_probability": (0.5, "share of each batch whose student view is masked"),
        "mask_ratio": ([0.5], "share of patches masked: one value, or LO HI for stratified ratios"),
        "lambda_token": (1.0, "weight of the CLS-token loss"),
        "lambda_fea": (1.0, "weight of the feature loss (CLS + all patches, unmasked view)"),
        "lambda_patch": (1.0, "weight of the masked-patch loss"),
    },
    "optimisation": {
        "epochs": (300, "training epochs"),
        "warmup_epochs": (5, "linear warmup, counted in iterations (epochs x steps per epoch)"),
        "lr": (5e-4, "base learning rate for a global batch of --lr-reference-batch (linear scaling)"),
        "lr_reference_batch": (512, "lr = --lr x global batch / this (DeiT rule)"),
        "min_lr": (1e-5, "cosine floor"),
        "warmup_lr": (1e-6, "learning rate at step 0"),
        "weight_decay": (0.05, "AdamW weight decay (none on 1-D params and biases)"),
        "decay_tokens": (True, "weight-decay pos/cls/mask tokens (original: yes; --no-decay-tokens: timm/DeiT style)"),
        "opt_betas": ([0.9, 0.999], "AdamW betas"),
        "opt_eps": (1e-8, "AdamW epsilon"),
        "clip_grad": (0.0, "max gradient norm (0 = no clipping, as the original)"),
        "fused_adamw": ("auto", "fused AdamW kernel: auto (on for CUDA), on, off"),
        "ema_decay": (0.99996, "EMA of the student per step (0 = no EMA; then no student_backbone_ema.pth)"),
        "precision": ("auto", "auto (bf16 on GPUs and CPUs with native bf16, else fp32), bf16 autocast, fp16 "
                              "autocast + GradScaler, or fp32"),
        "compile": (False, "torch.compile the student and teacher forward"),
    },
    "runtime": {
        "device": ("auto", "auto (cuda:<local rank> if a GPU is visible, else cpu), cpu, cuda"),
        "seed": (0, "base seed; rank r uses seed + r"),
        "output_dir": ("output/pretrain", "checkpoints, log.txt, TensorBoard, exported backbones"),
        "save_every_steps": (500, "also checkpoint every N steps (0 = only at epoch ends)"),
        "keep_checkpoints": (2, "checkpoints kept (checkpoint.pth, checkpoint.1.pth, ...): a corrupt one falls back"),
        "max_save_failures": (3, "consecutive failed checkpoint writes (disk full, ...) before the run stops"),
        "allow_resume_change": ("", "comma list of keys a resume may change, e.g. epochs or epochs,lr "
                                    "(see RESUME_CHANGEABLE); any other change is refused"),
        "log_every": (10, "progress line, log.txt and TensorBoard every N steps"),
        "pca_every_epochs": (5, "TensorBoard PCA image of student vs teacher patch features (0 = off)"),
        "max_bad_steps": (20, "fp16: consecutive scaler-skipped / non-finite steps tolerated before stopping"),
        "dist_timeout_min": (30, "collective timeout in minutes"),
    },
}
CHOICES = {"on_bad_image": ("skip", "fail"), "precision": ("auto", "bf16", "fp16", "fp32"),
           "fused_adamw": ("auto", "on", "off"), "teacher_dtype": ("auto", "fp32", "bf16"),
           "train_interpolation": ("bicubic", "bilinear", "nearest", "random"),
           "teacher_norm": ("auto", "phi-s", "none")}
# Allowed range of every numeric knob: (low, high, low inclusive, high inclusive); None = unbounded.
# A test checks that every int/float knob of CONFIG has an entry, so a new knob cannot skip validation.
LIMITS = {
    "input_size": (1, None, True, True), "batch_size": (1, None, True, True),
    "global_batch_size": (0, None, True, True), "num_workers": (0, None, True, True),
    "max_image_pixels": (1, None, True, True), "repeated_aug": (1, None, True, True),
    "class_fraction": (0, 1, False, True), "images_per_class": (0, None, True, True),
    "single_image_length": (1, None, True, True), "reprob": (0, 1, True, True),
    "patch_size": (1, None, True, True), "drop_path": (0, 1, True, False),
    "mask_probability": (0, 1, True, True), "lambda_token": (0, None, True, True),
    "lambda_fea": (0, None, True, True), "lambda_patch": (0, None, True, True),
    "epochs": (1, None, True, True), "warmup_epochs": (0, None, True, True), "lr": (0, None, False, True),
    "lr_reference_batch": (1, None, True, True), "min_lr": (0, None, True, True),
    "warmup_lr": (0, None, True, True), "weight_decay": (0, None, True, True), "opt_eps": (0, None, False, True),
    "clip_grad": (0, None, True, True), "ema_decay": (0, 1, True, False), "seed": (0, 2**31 - 1, True, True),
    "save_every_steps": (0, None, True, True), "keep_checkpoints": (1, None, True, True),
    "max_save_failures": (1, None, True, True), "log_every": (1, None, True, True),
    "pca_every_epochs": (0, None, True, True), "max_bad_steps": (0, None, True, True),
    "teacher_norm_batches": (1, None, True, True),
    "dist_timeout_min": (1, None, True, True),
}
# Resume: keys that never change results (free), and keys a rerun may change when named in
# --allow-resume-change (the schedule is rebuilt from the new values). Every other key must match.
RESUME_FREE = ("output_dir", "num_workers", "pin_mem", "log_every", "pca_every_epochs", "save_every_steps",
               "keep_checkpoints", "max_save_failures", "dist_timeout_min", "max_bad_steps", "device",
               "compile", "allow_resume_change", "world_size")
RESUME_CHANGEABLE = ("epochs", "lr", "min_lr", "warmup_lr", "clip_grad", "data_path", "teacher_checkpoint",
                     "precision", "teacher_dtype", "on_bad_image", "max_image_pixels", "fused_adamw", "student")
# Compared per student (pretrain/students.py) instead of as flags: a student is identified by its key, and
# `--allow-resume-change student` adds or drops students while the others must keep their settings.
STUDENT_KNOBS = ("student", "student_kwargs", "student_lr", "student_drop_path", "drop_path", "lr")
STUDENT_FIELDS = {"arch": "student", "kwargs": "student_kwargs", "drop_path": "drop_path", "lr": "lr"}
# One vocabulary with the evaluations and models.export (--arch / --model-kwargs / --image-size there)
ALIASES = {"student": ("--arch",), "student_kwargs": ("--model-kwargs",), "input_size": ("--image-size",)}
EXIT_BAD_CONFIG = 2
RUN_FILES = ("config.json", "checkpoint.pth", "log.txt", "student_backbone.pth")  # what a run writes at its top
PCA_IMAGES = 4  # images in the fixed PCA batch
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


# ==========================================================================================================
# Config: CLI parsing and validation (cheap; runs before anything heavy)
# ==========================================================================================================
def build_parser():
    import argparse

    parser = ConfigArgumentParser("pretrain.main", description=__doc__.split("\n\n")[0],  # -c/--config FILE
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group, knobs in CONFIG.items():
        g = parser.add_argument_group(group)
        for name, (default, help_text) in knobs.items():
            flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, ())]
            if isinstance(default, bool):
                g.add_argument(*flags, default=default, action=argparse.BooleanOptionalAction, help=help_text)
            elif isinstance(default, list):
                g.add_argument(*flags, default=default, nargs="+", type=type(default[0]), help=help_text)
            else:
                g.add_argument(*flags, default=default, type=type(default), choices=CHOICES.get(name), help=help_text)
    return parser


def parse_config(argv=None) -> dict:
    return vars(build_parser().parse_args(argv))


def parse_student_kwargs(text: str) -> dict:
    """'depth=2,embed_dim=64' or the JSON the evaluation entry points take ('{"depth": 2}') -> dict of ints."""
    return models.parse_size_kwargs(text, "--student-kwargs")


# ---- teachers: comma lists of names, checkpoints and weights ----------------------------------------------
def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")] if text.strip() else []


def teacher_list(cfg: dict) -> list[dict]:
    """[{name, checkpoint, weight}] in --teacher order, from the three comma lists."""
    names = split_list(cfg["teacher"])
    ckpts = split_list(cfg["teacher_checkpoint"])
    weights = split_list(cfg["teacher_weight"]) or ["1"] * len(names)
    if not names or len(set(names)) != len(names) or "" in names:
        raise ValueError(f"--teacher takes distinct comma-separated names, got {cfg['teacher']!r}")
    if len(ckpts) > len(names):
        raise ValueError(f"--teacher-checkpoint has {len(ckpts)} entries for {len(names)} teacher(s); give one "
                         f"per teacher, in order (an empty entry means the default download)")
    if len(weights) != len(names):
        raise ValueError(f"--teacher-weight has {len(weights)} values for {len(names)} teacher(s)")
    try:
        values = [float(w) for w in weights]
    except ValueError as e:
        raise ValueError(f"--teacher-weight takes numbers, got {cfg['teacher_weight']!r}") from e
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise ValueError(f"--teacher-weight values must be finite and > 0, got {values}")
    ckpts += [""] * (len(names) - len(ckpts))
    return [dict(name=n, checkpoint=c, weight=w) for n, c, w in zip(names, ckpts, values)]


def check_teacher(t: dict, cfg: dict) -> None:
    name = t["name"]
    if models.is_timm_name(name):
        import timm

        if not timm.is_model(name[len("timm:"):]):
            raise ValueError(f"--teacher {name}: timm has no model of that name (see timm.list_models())")
    elif name not in models.TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; expected one of {models.TEACHERS} or timm:<name>")
    spec = models.teacher_spec(name)
    if spec is not None and cfg["input_size"] % spec.patch_size:
        raise ValueError(f"--input-size {cfg['input_size']} is not a multiple of teacher {name}'s patch size "
                         f"{spec.patch_size}")


def objectives_of(cfg: dict, patch_targets: bool) -> tuple[str, ...]:
    return select_objectives(patch_targets, lambdas_of(cfg), cfg["mask_probability"])


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """Size + SHA-256 of the first and last MiB: a file overwritten in place changes it, a copy does not
    (cheap for multi-GB teachers)."""
    import hashlib

    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        h.update(f.read(chunk))
    return f"{size}:{h.hexdigest()[:16]}"


def lambdas_of(cfg: dict) -> dict:
    return {"token": cfg["lambda_token"], "fea": cfg["lambda_fea"], "patch": cfg["lambda_patch"]}


def validate_config(cfg: dict, world_size: int) -> None:
    """Every configuration error we can detect without loading a model or a dataset (ConfigError)."""
    try:
        _validate(cfg, world_size)
    except UserError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # the checks below and the helpers they call
        raise ConfigError(str(e)) from e


def _validate(cfg: dict, world_size: int) -> None:
    check_limits(cfg)
    check_students(cfg, world_size)
    teachers = teacher_list(cfg)
    validate_mask_config(cfg["mask_probability"], cfg["mask_ratio"])
    for t in teachers:
        check_teacher(t, cfg)
        spec = models.teacher_spec(t["name"])
        objectives_of(cfg, spec.patch_targets if spec is not None else True)
    check_optimisation(cfg, world_size)
    check_augmentation(cfg)
    parse_resume_changes(cfg["allow_resume_change"])
    resolve_device(cfg["device"])  # --device cuda without a GPU fails here, not after the teacher loaded
    if cfg["single_image"]:
        if not os.path.isfile(cfg["single_image"]):
            raise FileNotFoundError(f"--single-image {cfg['single_image']!r} does not exist")
        try:
            cdata.load_rgb(cfg["single_image"])
        except cdata.BAD_IMAGE_ERRORS as e:
            raise ValueError(f"--single-image {cfg['single_image']!r} is not a readable image: {e}") from e
    else:
        check_data_sources(cfg)
        check_output_dir(cfg)
    for t in teachers:
        if t["checkpoint"] and not os.path.isfile(t["checkpoint"]):
            raise FileNotFoundError(f"--teacher-checkpoint {t['checkpoint']!r} (teacher {t['name']}) does not exist")


def check_limits(cfg: dict) -> None:
    """Each numeric knob within its LIMITS range (and finite)."""
    for name, (lo, hi, lo_in, hi_in) in LIMITS.items():
        v = cfg[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v}")
        if (lo is not None and (v < lo if lo_in else v <= lo)) or (hi is not None and (v > hi if hi_in else v >= hi)):
            span = (f"{'[' if lo_in else '('}{lo}, {hi if hi is not None else 'inf'}{']' if hi_in else ')'}")
            raise ValueError(f"{flag} must be in {span}, got {v}")


def check_data_sources(cfg: dict) -> None:
    """Each --data-path is an ImageFolder, a flat folder, a list file, or (alone) a tar-shard pattern."""
    if any(shards.is_shard_spec(p) for p in cfg["data_path"]):
        if len(cfg["data_path"]) != 1 or cfg["class_fraction"] != 1.0 or cfg["images_per_class"]:
            raise ValueError("tar shards take one --data-path pattern and no --class-fraction / --images-per-class "
                             "(make a proxy subset when writing the shards)")
        shards.check_shards(cfg["data_path"][0])
        return
    for root in cfg["data_path"]:
        cdata.pretrain_source_kind(root)


def check_optimisation(cfg: dict, world_size: int) -> None:
    if cfg["global_batch_size"] and cfg["global_batch_size"] % world_size:
        raise ValueError(f"--global-batch-size {cfg['global_batch_size']} is not divisible by the {world_size} "
                         f"processes; use a multiple of {world_size}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise ValueError(f"need 0 <= --warmup-epochs <= --epochs, got {cfg['warmup_epochs']} / {cfg['epochs']}")
    betas = cfg["opt_betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"--opt-betas takes two values in [0, 1), got {betas}")
    lo_hi = cfg["crop_scale"]
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ValueError(f"--crop-scale takes LO HI with 0 < LO <= HI <= 1 (share of the image area), got {lo_hi}")


def check_students(cfg: dict, world_size: int) -> None:
    """Every --student entry, and each one's peak learning rate against --min-lr."""
    specs = student_specs(cfg)
    global_batch = cfg["global_batch_size"] or cfg["batch_size"] * world_size
    for spec in specs:
        try:
            check_student({**cfg, "student": spec.arch, "student_kwargs": spec.kwargs})
        except ValueError as e:
            raise ValueError(f"student {spec.key}: {e}" if len(specs) > 1 else str(e)) from e
        if spec.drop_path >= 1:
            raise ValueError(f"--student-drop-path must be in [0, 1), got {spec.drop_path} for {spec.key}")
        peak = optim.scaled_lr(spec.lr, global_batch, cfg["lr_reference_batch"])
        if not peak > 0:
            raise ValueError(f"--student-lr must be > 0, got {spec.lr} for {spec.key}")
        if cfg["min_lr"] > peak:
            raise ValueError(f"--min-lr {cfg['min_lr']} is above the peak learning rate {peak:.3g} of student "
                             f"{spec.key} (lr {spec.lr} x global batch {global_batch} / --lr-reference-batch "
                             f"{cfg['lr_reference_batch']})")


def check_student(cfg: dict) -> None:
    name, kwargs = cfg["student"], parse_student_kwargs(cfg["student_kwargs"])
    if models.is_timm_name(name):
        import timm

        if not timm.is_model(name[len("timm:"):]):
            raise ValueError(f"--student {name}: timm has no model of that name (see timm.list_models())")
        check_timm_kwargs(name, kwargs, cfg["input_size"])
        return
    if name not in models.STUDENTS:
        raise ValueError(f"unknown student {name!r}; expected one of {models.STUDENTS} or timm:<name>")
    size, p = cfg["input_size"], cfg["patch_size"]
    if size % p:
        raise ValueError(f"--patch-size {p} does not divide --input-size {size}; pick a multiple, e.g. "
                         f"--input-size {max(p, size // p * p)}")
    check_student_kwargs(kwargs, name)


def check_timm_kwargs(name: str, kwargs: dict, input_size: int) -> None:
    """A timm student's keyword arguments are timm's: build it on the meta device (no memory, no init) so that
    a wrong one fails here, before the run starts, not as a TypeError after the teacher loaded."""
    try:
        with torch.device("meta"):
            models.build_student(name, img_size=input_size, **kwargs)
    except TypeError as e:
        raise ValueError(f"--student-kwargs {kwargs} do not fit {name}: {e} (a timm student takes "
                         f"timm.create_model's own arguments; with several students give one ';' entry each)") from e


def check_student_kwargs(kwargs: dict, student: str) -> None:
    allowed = ("depth", "embed_dim", "num_heads", "num_register_tokens")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"--student-kwargs: unknown key(s) {unknown}; allowed: {list(allowed)}")
    low = {k: v for k, v in kwargs.items() if v < (0 if k == "num_register_tokens" else 1)}
    if low:
        raise ValueError(f"--student-kwargs values must be >= 1 (num_register_tokens >= 0), got {low}")
    dim, _, heads = models.VIT_SIZES[student]
    dim, heads = kwargs.get("embed_dim", dim), kwargs.get("num_heads", heads)
    if dim % heads:
        raise ValueError(f"--student-kwargs: embed_dim {dim} is not divisible by num_heads {heads}")


def check_augmentation(cfg: dict) -> None:
    """Build the training transform once: timm rejects unknown RandAugment policies here, not in a worker."""
    import re

    aa = cfg["aa"]
    if aa.startswith("rand") and not all(re.fullmatch(RAND_AUGMENT_SECTION, sec) for sec in aa.split("-")[1:]):
        raise ValueError(f"--aa {aa!r} is not a timm augmentation policy such as rand-m9-mstd0.5-inc1: its sections "
                         f"after 'rand' must be m<int>, n<int>, mstd<float>, mmax<int>, inc<0|1> or p<float>")
    try:
        cdata.build_train_transform(cfg["input_size"], cfg["aa"] or None, cfg["reprob"], cfg["train_interpolation"],
                                    scale=cfg["crop_scale"])
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"--aa {cfg['aa']!r} is not a timm augmentation policy such as rand-m9-mstd0.5-inc1 "
                         f"(or '' for none): {type(e).__name__}: {e}") from e


def check_output_dir(cfg: dict) -> None:
    """The run must not write into its own data (every folder under an ImageFolder root is a class), and
    every student's export folder OUTPUT/<key> must be a folder or free."""
    specs = student_specs(cfg)
    for spec in specs if len(specs) > 1 else ():
        folder = os.path.join(cfg["output_dir"], spec.key)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{folder} is a file, but student {spec.key} exports into that folder at the end; "
                             f"move the file away or use a new --output-dir")
    out = os.path.realpath(cfg["output_dir"])
    roots = [] if cfg["single_image"] else [p for p in cfg["data_path"] if os.path.isdir(p)]
    for root in roots:
        root = os.path.realpath(root)
        if out == root or out.startswith(root + os.sep):
            raise ValueError(f"--output-dir {cfg['output_dir']!r} is inside --data-path {root!r}: the run would write "
                             f"into its own training data; choose an output dir outside it")


RAND_AUGMENT_SECTION = r"(m|n|mstd|mmax|inc|p)[0-9.]+|t\w+"  # timm's rand-* keys (others are silently skipped)


def parse_resume_changes(text: str) -> set[str]:
    keys = {k.strip().lstrip("-").replace("-", "_") for k in text.split(",") if k.strip()}
    bad = sorted(keys - set(RESUME_CHANGEABLE))
    if bad:
        raise ValueError(f"--allow-resume-change: {bad} cannot change on resume; changeable: "
                         f"{', '.join(RESUME_CHANGEABLE)} (anything else needs a new --output-dir)")
    return keys


def resolve_derived(cfg: dict, info: DistInfo) -> dict:
    """Quantities computed from the knobs (printed and stored in config.json, never configured)."""
    cfg = dict(cfg, tool="pretrain")
    # absolute: config.json must name the files it used
    cfg["teacher_checkpoint"] = ",".join(os.path.abspath(t["checkpoint"]) if t["checkpoint"] else ""
                                         for t in teacher_list(cfg))
    cfg["single_image"] = os.path.abspath(cfg["single_image"]) if cfg["single_image"] else ""
    cfg["teacher_fingerprint"] = ",".join(file_fingerprint(t["checkpoint"]) if t["checkpoint"] else ""
                                          for t in teacher_list(cfg))
    cfg["data_path"] = [os.path.abspath(p) for p in cfg["data_path"]]
    cfg["precision_requested"] = cfg["precision"]
    cfg["precision"], cfg["precision_reason"] = resolve_precision(cfg["precision"], info.device)
    log.info("precision %s (%s)", cfg["precision"], cfg["precision_reason"])
    if cfg["global_batch_size"]:
        cfg["batch_size"] = cfg["global_batch_size"] // info.world_size
    cfg["world_size"] = info.world_size
    cfg["global_batch"] = cfg["batch_size"] * info.world_size
    cfg["lr_scaled"] = optim.scaled_lr(cfg["lr"], cfg["global_batch"], cfg["lr_reference_batch"])
    cfg["students"] = [{**spec.as_dict(), "lr_scaled": optim.scaled_lr(spec.lr, cfg["global_batch"],
                                                                       cfg["lr_reference_batch"])}
                       for spec in student_specs(cfg)]
    if len(cfg["students"]) == 1:  # its --student-lr, if any, is the run's lr
        cfg["lr_scaled"] = cfg["students"][0]["lr_scaled"]
    if cfg["teacher_norm"] == "auto":
        cfg["teacher_norm"] = "phi-s" if len(teacher_list(cfg)) > 1 else "none"
    return cfg


# ==========================================================================================================
# Builders
# ==========================================================================================================
def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)  # the original left Python's RNG unseeded (RandAugment draws from it)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_teachers(cfg: dict, device: torch.device) -> dict:
    """{name: frozen Teacher} in --teacher order, on `device`, in their weight dtype; records the objectives."""
    teachers = {}
    for t in teacher_list(cfg):
        teacher = models.build_teacher(t["name"], t["checkpoint"] or None, img_size=cfg["input_size"])
        teacher.to(device)
        dtype = teacher_weight_dtype(cfg, device)
        if dtype != torch.float32:
            teacher.to(dtype)
        if cfg["compile"]:
            teacher.backbone.compile()
        teachers[t["name"]] = teacher
        if not teacher.patch_targets and (cfg["lambda_fea"] or cfg["lambda_patch"]):
            log.info("%s: token objective only (its patch tokens get no training signal); --lambda-fea / "
                     "--lambda-patch do not apply to it", t["name"])
    cfg["objectives"] = {k: list(objectives_of(cfg, t.patch_targets)) for k, t in teachers.items()}
    return teachers


def distillation_grid(cfg: dict, teachers: dict) -> tuple[int, int]:
    """The token grid every target lives on: the ViT student's patch grid, else the first teacher's."""
    if all(models.is_timm_name(s.arch) for s in student_specs(cfg)):
        p = next(iter(teachers.values())).patch_size
    else:  # a ViT student's patch grid (timm students resample their feature map onto it)
        p = cfg["patch_size"]
    return cfg["input_size"] // p, cfg["input_size"] // p


def teacher_grids(cfg: dict, teachers: dict) -> dict:
    return {k: (cfg["input_size"] // t.patch_size,) * 2 for k, t in teachers.items()}


def teacher_weight_dtype(cfg: dict, device: torch.device) -> torch.dtype:
    """auto: on GPU under bf16/fp16 a frozen teacher needs no fp32 master weights (bf16 halves its memory and
    bandwidth; the targets move by about 1 % relative); fp32 keeps the original's fp32 weights under autocast."""
    choice = cfg["teacher_dtype"]
    if choice == "bf16":
        return torch.bfloat16
    if choice == "auto" and device.type == "cuda" and cfg["precision"] != "fp32":
        # the autocast dtype itself: bf16 weights under fp16 autocast mix dtypes in the token concat
        return torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16
    return torch.float32


def build_student_run(cfg: dict, spec, teachers: dict, grid: tuple[int, int], info: DistInfo,
                      steps_per_epoch: int) -> StudentRun:
    """One student + heads (initial weights from its own seeded stream), wrapped in DDP when distributed,
    with its AdamW, schedule, scaler and EMA."""
    with seeded(init_seed(cfg["seed"], spec.key), info.device):
        distiller = build_distiller(cfg, spec, teachers, grid).to(info.device)
    if cfg["compile"]:
        distiller.student.compile()  # in place: state_dict keys stay DINOv2's (no `_orig_mod.`)
    model = distiller
    if info.distributed:
        # one DDP module per student: each student's backward (and its gradient all-reduce) runs right after
        # its forward, so only one student's activations are alive; every head is used (no unused params)
        model = torch.nn.parallel.DistributedDataParallel(
            distiller, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    lr_scaled = optim.scaled_lr(spec.lr, cfg["global_batch"], cfg["lr_reference_batch"])
    optimizer, scheduler, scaler, ema = build_optimisation(cfg, distiller, steps_per_epoch, lr_scaled)
    run = StudentRun(spec, distiller, model, optimizer, scheduler, scaler, ema, lr_scaled)
    n_params = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
    mem = run.memory_mib()
    log.info("student %s (%s%s) on a %dx%d grid + heads %s: %.2fM trainable parameters, lr %.3g; holds %.0f MiB "
             "(params %.0f, grads %.0f, AdamW %.0f, EMA %.0f); teachers %s", spec.key, spec.arch,
             f", {spec.kwargs}" if spec.kwargs else "", *grid, json.dumps(cfg["objectives"]), n_params / 1e6,
             lr_scaled, sum(mem.values()), mem["params"], mem["grads"], mem["adamw"], mem["ema"],
             ", ".join(f"{k} ({t.embed_dim}-d, patch {t.patch_size})" for k, t in teachers.items()))
    return run


def build_distiller(cfg: dict, spec, teachers: dict, grid: tuple[int, int]) -> ProteusDistiller:
    student = build_student_module(spec, cfg)
    weights = {t["name"]: t["weight"] for t in teacher_list(cfg)}
    targets = [TargetSpec(k, t.embed_dim, tuple(cfg["objectives"][k]), weights[k]) for k, t in teachers.items()]
    return ProteusDistiller(student, targets, lambdas_of(cfg), grid)


def build_normaliser(cfg: dict, teachers: dict) -> TargetNormaliser | None:
    if cfg["teacher_norm"] != "phi-s":
        return None
    return TargetNormaliser({k: t.embed_dim for k, t in teachers.items()})


def fit_teacher_norm(trainer: Trainer, cfg: dict) -> None:
    """Estimate PHI-S from the first --teacher-norm-batches batches, leaving every RNG stream as it was."""
    norm = trainer.normaliser
    if norm is None or norm.fitted:
        return
    rng = ckpt_state.capture_rng()
    batches = (b[0].to(trainer.dist_info.device) for b, _ in itertools.islice(
        (x for x in trainer.batches() if x[0] is not None), cfg["teacher_norm_batches"]))
    n = fit_normaliser(norm, batches, lambda x: prepare_targets(trainer.raw_teacher_outputs(x), trainer.grids,
                                                                trainer.distiller.grid, None))
    ckpt_state.restore_rng(rng)
    norm.to(trainer.dist_info.device)
    log.info("PHI-S teacher normalisation estimated on %d images (%d batches per rank)", n, cfg["teacher_norm_batches"])


def build_data(cfg: dict, info: DistInfo):
    """(loader, loader generator, steps per epoch, fixed PCA batch)."""
    cdata.set_max_image_pixels(cfg["max_image_pixels"])
    transform = cdata.build_train_transform(cfg["input_size"], cfg["aa"] or None, cfg["reprob"],
                                            cfg["train_interpolation"], scale=cfg["crop_scale"])
    if shards.is_shard_spec(cfg["data_path"][0]) and not cfg["single_image"]:  # --single-image replaces the data
        return build_shard_data(cfg, info, transform)
    dataset = cdata.build_pretrain_dataset(cfg["data_path"], transform, cfg["on_bad_image"], cfg["class_fraction"],
                                           cfg["images_per_class"], cfg["single_image"],
                                           cfg["single_image_length"], cfg["seed"])
    sampler = cdata.build_train_sampler(dataset, info.world_size, info.rank, cfg["repeated_aug"], cfg["seed"])
    steps_per_epoch = len(sampler) // cfg["batch_size"]
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} images give {len(sampler)} per process, less than one batch of "
                        f"{cfg['batch_size']}: lower --batch-size or use more data")
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
        pin_memory=cfg["pin_mem"] and info.device.type == "cuda", drop_last=True,
        collate_fn=cdata.collate_skip_bad, worker_init_fn=_worker_init, generator=generator,
        persistent_workers=False)
    log.info("data: %d images, %d steps/epoch of %d x %d processes", len(dataset), steps_per_epoch,
             cfg["batch_size"], info.world_size)
    return loader, generator, steps_per_epoch, fixed_pca_batch(dataset, cfg)


def build_shard_data(cfg: dict, info: DistInfo, transform):
    """Tar shards streamed in whole batches (pretrain/shards.py): DeiT's repeated augmentation does not apply."""
    stream = shards.ShardStream(cfg["data_path"][0], transform, cfg["batch_size"], world_size=info.world_size,
                                rank=info.rank, seed=cfg["seed"], on_bad_image=cfg["on_bad_image"])
    if stream.steps_per_epoch == 0:
        raise DataError(f"{stream.num_samples} samples in {len(stream.urls)} shards give less than one batch of "
                        f"{cfg['batch_size']} per process: lower --batch-size or use more data")
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg["num_workers"], pin_memory=cfg["pin_mem"] and
        info.device.type == "cuda", collate_fn=shards.collate_shard_batch, worker_init_fn=_worker_init,
        generator=generator, persistent_workers=False)
    log.info("data: %d samples in %d shards, %d steps/epoch of %d x %d processes", stream.num_samples,
             len(stream.urls), stream.steps_per_epoch, cfg["batch_size"], info.world_size)
    return loader, generator, stream.steps_per_epoch, shard_pca_batch(stream, cfg)


def shard_pca_batch(stream, cfg: dict) -> torch.Tensor | None:
    """The first PCA_IMAGES readable images of the first shard, centre-cropped (no training RNG)."""
    if not cfg["pca_every_epochs"]:
        return None
    from webdataset.tariterators import tarfile_samples

    tf = cdata.build_eval_transform(resize=cfg["input_size"] * 256 // 224, crop=cfg["input_size"])
    images = []
    for sample in tarfile_samples([{"url": stream.urls[0]}], handler=lambda e: True):
        key = next((k for k in shards.IMAGE_KEYS if k in sample), None)
        try:
            images.append(tf(shards.decode_image(sample[key], stream.max_pixels)))
        except (TypeError, KeyError, *cdata.BAD_IMAGE_ERRORS):
            continue
        if len(images) == PCA_IMAGES:
            break
    return torch.stack(images) if images else None


def _worker_init(worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals: SLURM, `timeout`, container runtimes and Ctrl-C signal
    the whole process group, and a worker that dies of it takes the main process down before it can save."""
    for s in PREEMPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS)  # started blocked (Trainer.batches): now ignored
    cdata.seed_worker(worker_id)


def fixed_pca_batch(dataset, cfg: dict) -> torch.Tensor | None:
    """PCA_IMAGES evenly spaced training images, centre-cropped (deterministic, no training RNG)."""
    if not cfg["pca_every_epochs"]:
        return None
    tf = cdata.build_eval_transform(resize=cfg["input_size"] * 256 // 224, crop=cfg["input_size"])
    if cfg["single_image"]:
        paths = [cfg["single_image"]]
    else:
        parts = dataset.datasets if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]
        samples = [s for part in parts for s in part.samples]
        paths = [samples[i][0] for i in np.linspace(0, len(samples) - 1, PCA_IMAGES).astype(int)]
    images = []
    for path in dict.fromkeys(paths):
        try:
            images.append(tf(cdata.load_rgb(path)))
        except cdata.BAD_IMAGE_ERRORS:
            continue  # unreadable images are reported by the training loader
    return torch.stack(images) if images else None


def build_optimisation(cfg: dict, distiller, steps_per_epoch: int, lr_scaled: float):
    """(optimizer, per-iteration schedule, grad scaler, EMA of the student backbone or None)."""
    groups = optim.param_groups(distiller, cfg["weight_decay"], cfg["decay_tokens"])
    fused = {"auto": None, "on": True, "off": False}[cfg["fused_adamw"]]
    optimizer = optim.build_adamw(groups, lr_scaled, cfg["opt_betas"], cfg["opt_eps"], fused)
    scheduler = build_schedule(cfg, optimizer, steps_per_epoch)
    device_type = next(distiller.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=cfg["precision"] == "fp16")
    ema = optim.build_ema(distiller.student, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    return optimizer, scheduler, scaler, ema


# ==========================================================================================================
# The output directory: one run at a time, never another tool's, resumed only with the same configuration
# ==========================================================================================================
def claim_output_dir(cfg: dict, info: DistInfo) -> RunDirLock | None:
    """Rank 0 locks the output dir, checks that no other tool owns it and removes temp files of killed saves.

    Every rank learns the outcome, so a refused run stops on all ranks with the same message.
    """
    lock, error = None, ""
    if info.is_main:
        try:
            claim_run_dir(cfg["output_dir"], "pretrain", files=RUN_FILES)
            lock = RunDirLock(cfg["output_dir"]).acquire()
            remove_orphan_temps(cfg["output_dir"])
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise UserError(error)
    return lock


def find_resume_checkpoint(cfg: dict, info: DistInfo):
    """(checkpoint, path) to resume from, or (None, None). Rank 0 picks the file (unusable ones are moved
    aside, never deleted), every rank loads that same file."""
    ckpt, path = None, None
    if info.is_main:
        ckpt, path = ckpt_state.load_resume_checkpoint(cfg["output_dir"], cfg["keep_checkpoints"])
    path = broadcast_object(path)
    if path and not info.is_main:
        ckpt = ckpt_state.read_checkpoint(path)
    return ckpt, path


def prepare_fresh_start(cfg: dict, info: DistInfo) -> None:
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


def check_resume_config(cfg: dict, ckpt: dict | None, path: str | None) -> dict:
    """Refuse to resume with a configuration that differs from the checkpoint's, except for the keys named in
    --allow-resume-change; record the allowed changes. Returns cfg (with `resume_changes`)."""
    if ckpt is None:
        return cfg
    old = ckpt.get("config") or {}
    diffs = config_diff(old, cfg)
    allowed = parse_resume_changes(cfg["allow_resume_change"])
    if "teacher_checkpoint" in allowed:
        allowed.add("teacher_fingerprint")  # a replaced teacher file is a teacher change
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        changeable = sorted({"teacher_checkpoint" if k == "teacher_fingerprint" else k for k in refused}
                            & set(RESUME_CHANGEABLE))
        hint = (f" If the change is intended, pass --allow-resume-change {','.join(changeable)}." if changeable
                else "")
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
    return {**cfg, "resume_changes": history}


def config_diff(old: dict, new: dict) -> dict:
    """{key: (old, new)} over every result-changing key (knobs + the global batch), paths made absolute."""
    keys = [k for group in CONFIG.values() for k in group if k not in RESUME_FREE and k not in STUDENT_KNOBS]
    keys = [k for k in keys if k not in ("batch_size", "global_batch_size")] + ["global_batch"]
    if any(shards.is_shard_spec(p) for p in new["data_path"]):
        keys.append("num_workers")  # tar shards: the loader's workers define the sample order
    if "teacher_fingerprint" in old:
        keys.append("teacher_fingerprint")  # the same path holding other weights is another teacher
    out = {}
    for k in keys:
        if k == "precision" and "precision_requested" in old:
            a, b = old["precision_requested"], new["precision_requested"]
        else:
            a, b = old.get(k, _default(k)), new.get(k)
        a, b = _normalise(k, a), _normalise(k, b)
        if a != b:
            out[k] = (a, b)
    return {**out, **student_diff(old, new)}


def recorded_specs(old: dict) -> list:
    """The students a checkpoint's configuration names (knobs it predates take today's defaults)."""
    return student_specs({k: old.get(k, _default(k)) for k in STUDENT_KNOBS})


def student_diff(old: dict, new: dict) -> dict:
    """Student changes by flag: `student` when students were added or dropped ({key: arch} before and now);
    for every student in both, a changed architecture, kwargs, drop path or lr under that knob's name."""
    before = {s.key: s for s in recorded_specs(old)}
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


def _default(key: str):
    return next((knobs[key][0] for knobs in CONFIG.values() if key in knobs), None)


def _normalise(key: str, value):
    if key in ("data_path", "teacher_checkpoint", "single_image"):
        if isinstance(value, (list, tuple)):
            return [os.path.abspath(v) for v in value]
        return os.path.abspath(value) if value else ""
    return list(value) if isinstance(value, tuple) else value


def resume(trainer: Trainer, ckpt: dict | None, path: str | None, info: DistInfo) -> None:
    if ckpt is None:
        log.info("no checkpoint in %s: starting from scratch", trainer.cfg["output_dir"])
        return
    set_aside_stale_exports(trainer, ckpt, info)
    export_dropped_students(trainer, ckpt, info)
    trainer.progress = ckpt_state.restore(ckpt, trainer.students, trainer.mask_gen, info.rank, info.world_size,
                                          trainer.normaliser)
    for run in trainer.students:
        if run.start_step:  # joined later: its warm-up and cosine span the steps it has left
            run.scheduler = build_schedule(trainer.cfg, run.optimizer, trainer.steps_per_epoch, run.start_step)
    trainer.last_good = f"{path} (step {trainer.progress.global_step})"
    p = trainer.progress
    log.info("resumed from %s: epoch %d, batch %d/%d, step %d", path, p.epoch, p.step_in_epoch,
             trainer.steps_per_epoch, p.global_step)


def build_schedule(cfg: dict, optimizer, steps_per_epoch: int, start_step: int = 0):
    """Warm-up + cosine over the steps from `start_step` (a student's join step; 0 for the run's own students)
    to the end of the run."""
    left = max(cfg["epochs"] * steps_per_epoch - start_step, 1)
    return optim.build_cosine_schedule(optimizer, left, min(cfg["warmup_epochs"] * steps_per_epoch, left),
                                       cfg["min_lr"], cfg["warmup_lr"])


def set_aside_stale_exports(trainer: Trainer, ckpt: dict, info: DistInfo) -> None:
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


def export_dropped_students(trainer: Trainer, ckpt: dict, info: DistInfo) -> None:
    """A student dropped on resume (--allow-resume-change student) loses nothing: its weights at the checkpoint
    are exported to OUTPUT/<key>/ as a finished run's would be."""
    kept = {run.key for run in trainer.students}
    old_cfg = ckpt.get("config") or {}
    old_specs = {s.key: s for s in recorded_specs(old_cfg)}
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


def student_view(cfg: dict, spec, **extra) -> dict:
    """The configuration as a one-student run of `spec` would record it: what models.export, the evaluations
    and models.load_backbone read from a config.json beside the weights."""
    view = {k: v for k, v in cfg.items() if k not in ("students", "student_lr", "student_drop_path")}
    if spec is not None:
        view.update(student=spec.arch, student_kwargs=spec.kwargs, drop_path=spec.drop_path, lr=spec.lr,
                    student_key=spec.key)
    return {**view, **extra, "tool": "pretrain"}


def check_steps_per_epoch(cfg: dict, ckpt: dict | None, steps_per_epoch: int) -> None:
    """A resumed epoch continues at a batch offset: the data must give the same number of batches."""
    old = (ckpt or {}).get("config", {}).get("steps_per_epoch")
    if old is not None and old != steps_per_epoch:
        raise ConfigError(f"the data now gives {steps_per_epoch} steps per epoch, the checkpoint's run had {old} "
                          f"(images added or removed under --data-path?): a resume would replay or skip images. "
                          f"Restore the data or use a new --output-dir")


def write_run_config(cfg: dict, info: DistInfo, resumed_from: str | None) -> None:
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


def finish(trainer: Trainer, cfg: dict, info: DistInfo) -> None:
    """Export every student: at the top of OUTPUT for one, in OUTPUT/<key>/ (with its config.json) for several."""
    if not info.is_main:
        return
    for run in trainer.students:
        folder = os.path.join(cfg["output_dir"], run.key) if trainer.multi else cfg["output_dir"]
        try:
            os.makedirs(folder, exist_ok=True)
            paths = ckpt_state.export_backbones(run, folder)
            if trainer.multi:
                write_json(os.path.join(folder, "config.json"), student_view(cfg, run.spec))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            raise StopTraining(f"training finished but the backbone export of {run.key} failed: {e}. The "
                               f"checkpoint ({trainer.last_good}) holds the weights: free space and rerun the same "
                               f"command to export.", ckpt_state.EXIT_SAVE_FAILED) from e
        arch = run.spec.arch
        how = (f"timm keys: timm.create_model('{arch[len('timm:'):]}', num_classes=0, pretrained=True, "
               f"pretrained_cfg_overlay=dict(file=...))" if models.is_timm_name(arch)
               else "DINOv2 keys; models.load_backbone or timm vit_*_patch14_dinov2")
        log.info("exported %s (%s)", ", ".join(paths), how)


# ==========================================================================================================
# main: a table of contents
# ==========================================================================================================
@cli("pretrain.main")
def main(argv=None) -> int:
    cfg = parse_config(argv)
    validate_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(cfg["device"], cfg["dist_timeout_min"])
    lock = None
    try:
        lock = claim_output_dir(cfg, info)
        setup_logging(cfg["output_dir"], info.rank, name="pretrain")
        return train(resolve_derived(cfg, info), info)
    finally:
        if lock is not None:
            lock.release()
        cleanup()


def train(cfg: dict, info: DistInfo) -> int:
    preempt = PreemptionFlag(PREEMPT_SIGNALS)  # from here on a signal means "checkpoint, then exit 75"
    try:
        ckpt, ckpt_path = find_resume_checkpoint(cfg, info)
        if ckpt is None:
            prepare_fresh_start(cfg, info)
        cfg = check_resume_config(cfg, ckpt, ckpt_path)
        seed_everything(cfg["seed"] + info.rank)
        trainer = build_trainer(cfg, info, ckpt, preempt)
        resume(trainer, ckpt, ckpt_path, info)
        del ckpt
        fit_teacher_norm(trainer, cfg)
        write_run_config(cfg, info, ckpt_path)
        return run(trainer, cfg, info)
    finally:
        preempt.restore()


def build_trainer(cfg: dict, info: DistInfo, ckpt: dict | None, preempt: PreemptionFlag) -> Trainer:
    """Data, teachers, student + heads, optimisation and masks, in the order their RNG use requires."""
    loader, loader_gen, steps_per_epoch, pca_batch = build_data(cfg, info)
    check_steps_per_epoch(cfg, ckpt, steps_per_epoch)
    cfg["steps_per_epoch"] = steps_per_epoch
    teachers = build_teachers(cfg, info.device)
    grid = distillation_grid(cfg, teachers)  # (gh, gw): every target of every student lives on it
    students = [build_student_run(cfg, spec, teachers, grid, info, steps_per_epoch) for spec in student_specs(cfg)]
    masked_view = students[0].distiller.masked_view  # the same objectives for every student
    mask_gen = MaskGenerator(grid[0] * grid[1], cfg["mask_probability"] if masked_view else 0.0,
                             cfg["mask_ratio"], seed=cfg["seed"] + info.rank)
    metrics = MetricLogger(cfg["output_dir"], enabled=info.is_main)
    return Trainer(cfg, info, students, teachers, mask_gen, loader, loader_gen, steps_per_epoch, metrics,
                   pca_batch=pca_batch, preempt=preempt, grids=teacher_grids(cfg, teachers),
                   normaliser=build_normaliser(cfg, teachers))


def run(trainer: Trainer, cfg: dict, info: DistInfo) -> int:
    try:
        trainer.train()
        finish(trainer, cfg, info)
        return 0
    except StopTraining as stop:
        (log.warning if stop.exit_code == EXIT_PREEMPTED else log.error)("%s", stop)
        return stop.exit_code
    finally:
        trainer.metrics.close()


if __name__ == "__main__":
    sys.exit(main())
