"""Proteus pretraining: distil a frozen foundation model into a randomly initialised ViT on ImageNet-1K.

    torchrun --nproc_per_node=8 -m pretrain.main --data-path /data/imagenet/train --output-dir runs/s14
    python -m pretrain.main --help          # every knob below, with its default

The same command again resumes from --output-dir (mid-epoch, exactly); a changed configuration is refused unless
its keys are named in --allow-resume-change. Exit codes: 0 done, 2 bad input (nothing written), 3 non-finite loss,
74 checkpoints could not be written, 75 stopped by a signal after a checkpoint (rerun the same command).
"""
import models
from .config import OBJECTIVE_WEIGHTS, Knob as K, float_or_auto, knob_table
from .pipeline import WORKERS_AUTO

FREE, CHANGE = "free", "changeable"  # resume policy; every other knob must match the checkpoint's
# ==========================================================================================================
# The knobs: the paper's ViT-S recipe (S/14 <- DINOv2-B/14, the original run_pretrain.sh). Each is a flag
# (data_path -> --data-path) and a key of a -c config file. Ranges: ge/gt/le/lt. student=True: per student.
# ==========================================================================================================
KNOBS = knob_table(
    "data",
    K("data_path", ["data/imagenet/train"], "ImageFolder root(s) ROOT/<class>/<img>, flat image folders, text files "
      "listing image paths (several are merged), or one tar-shard pattern 'DIR/shards-{000000..001281}.tar'",
      resume=CHANGE),
    K("input_size", 224, "training crop size (the teacher sees the same crop)", ge=1, aliases=("--image-size",)),
    K("batch_size", 0, "images per process per forward (0: --global-batch-size / processes, else 128)", ge=0),
    K("global_batch_size", 0, "if > 0: images per step; G / (batch x processes) micro-batches accumulate", ge=0),
    K("num_workers", WORKERS_AUTO, "DataLoader worker processes per rank; auto: the CPUs this process may use, "
      "shared by the node's ranks, less one (pretrain/pipeline.py)", ge=0, resume=FREE),
    K("data_pipeline", "fast", "fast: DeiT augmentation with less CPU work, same distribution (uint8 batches "
      "finished on the GPU); gpu: workers only read the files, JPEGs are decoded and augmented on the GPU (few CPU "
      "cores per GPU; other formats are decoded in the workers); timm: timm's reference transform (docs/data.md)",
      ("fast", "gpu", "timm"), resume=CHANGE),
    K("pin_mem", True, "pinned host memory for faster host-to-GPU copies", resume=FREE),
    K("on_bad_image", "skip", "unreadable images: skip (warn + count) or fail", ("skip", "fail"), resume=CHANGE),
    K("max_image_pixels", 89_478_485, "larger images are bad images (decompression-bomb guard; PIL's limit)", ge=1,
      resume=CHANGE),
    K("repeated_aug", 3, "DeiT repeated augmentation under DDP: copies of each image per epoch (1 = off)", ge=1),
    K("class_fraction", 1.0, "proxy data: keep this fraction of the classes (paper §5, Table 10)", gt=0, le=1),
    K("images_per_class", 0.0, "proxy data: 0 = all, (0,1) = fraction, >= 1 = count per class", ge=0),
    K("single_image", "", "path of one image: the paper's ImageNet-Single (replaces --data-path)"),
    K("single_image_length", 1_281_167, "augmented views of --single-image per epoch (ImageNet's size)", ge=1),
    "augmentation",
    K("aa", "rand-m9-mstd0.5-inc1", "timm RandAugment policy (DeiT); '' disables it (and enables ColorJitter)"),
    K("reprob", 0.25, "random erasing probability (mode pixel, 1 region)", ge=0, le=1),
    K("train_interpolation", "bicubic", "RandomResizedCrop / RandAugment interpolation",
      ("bicubic", "bilinear", "nearest", "random")),
    K("crop_scale", [0.08, 1.0], "RandomResizedCrop area range LO HI (DeiT: 0.08 1; small images want more)"),
    "models",
    K("teacher", "dinov2_vitb14", "frozen teacher(s), comma-separated: names of models.TEACHER_FAMILIES "
      "(docs/teachers.md) or timm:<name>"),
    K("teacher_checkpoint", "", "teacher weights in the official format, comma-separated in --teacher's order "
      "(DINOv2: downloaded if empty)", resume=CHANGE),
    K("teacher_weight", "", "per-teacher loss weights, comma-separated (empty: 1 each)"),
    K("teacher_summary_index", "all", "the summary (cls) target: all (each family's default; C-RADIO: its summary "
      "tokens concatenated, k x width) or, comma-separated in --teacher order, one summary token's index (C-RADIO: "
      "the position in its file's summary_idxs; all for teachers with one summary). Recorded: teacher_summary"),
    K("teacher_norm", "auto", "per-teacher target normalisation: phi-s (PHI-S, RADIO), none, or auto (phi-s with "
      "several teachers, none with one)", ("auto", "phi-s", "none")),
    K("teacher_norm_batches", 8, "training batches that estimate the PHI-S statistics at the start", ge=1),
    K("teacher_dtype", "auto", "teacher weights: auto (on GPU the autocast dtype, bf16 or fp16; else fp32), fp32 "
      "(the original), bf16", ("auto", "fp32", "bf16"), resume=CHANGE),
    K("student", "vit_small", "student(s), comma-separated: vit_tiny, vit_small, vit_base, vit_large (DINOv2 ViT) or "
      "timm:<name> (any timm model, random init); several train jointly on one teacher pass, each exported to "
      "OUTPUT/<student>/", resume=CHANGE, student=True, aliases=("--arch",)),
    K("student_kwargs", "", "size overrides: depth=2,embed_dim=64,num_heads=2 or JSON as --model-kwargs of the evals; "
      "several students: one entry each, separated by ';' (one entry: all)", student=True, aliases=("--model-kwargs",)),
    K("student_lr", "", "per-student base lr overrides, comma-separated in --student order (empty entry: --lr); the "
      "linear scaling rule applies to each", student=True),
    K("student_drop_path", "", "per-student stochastic depth, comma-separated (empty entry: --drop-path)",
      student=True),
    K("patch_size", 14, "ViT student patch size (its grid is the distillation grid; teachers on another grid are "
      "resampled to it)", ge=1),
    K("drop_path", 0.0, "student stochastic depth (original: flag 0.1 but never applied, so 0)", ge=0, lt=1,
      student=True),
    "objective",
    K("mask_probability", 0.5, "share of each batch whose student view is masked", ge=0, le=1),
    K("mask_ratio", [0.5], "share of patches masked: one value, or LO HI for stratified ratios"),
    OBJECTIVE_WEIGHTS,  # --lambda-token / --lambda-fea / --lambda-patch: pretrain/losses.py OBJECTIVES
    "optimisation",
    K("epochs", 300, "training epochs", ge=1, resume=CHANGE),
    K("warmup_epochs", 5, "linear warmup, counted in iterations (epochs x steps per epoch)", ge=0),
    K("lr", 5e-4, "base learning rate for a global batch of --lr-reference-batch (linear scaling)", gt=0,
      resume=CHANGE, student=True),
    K("lr_reference_batch", 512, "lr = --lr x global batch / this (DeiT rule)", ge=1),
    K("min_lr", "auto", "cosine floor (auto: scaled as --lr, 1e-5 at 512)", ge=0, resume=CHANGE, parse=float_or_auto),
    K("warmup_lr", 1e-6, "learning rate at step 0", ge=0, resume=CHANGE),
    K("weight_decay", 0.05, "AdamW weight decay (none on 1-D params and biases)", ge=0),
    K("decay_tokens", True, "weight-decay pos/cls/mask tokens (original: yes; --no-decay-tokens: timm/DeiT style)"),
    K("opt_betas", [0.9, 0.999], "AdamW betas"),
    K("opt_eps", 1e-8, "AdamW epsilon", gt=0),
    K("clip_grad", 0.0, "max gradient norm (0 = no clipping, as the original)", ge=0, resume=CHANGE),
    K("fused_adamw", "auto", "fused AdamW kernel: auto (on for CUDA), on, off", ("auto", "on", "off"), resume=CHANGE),
    K("ema_decay", 0.99996, "EMA of the student per step (0 = no EMA; then no student_backbone_ema.pth)", ge=0, lt=1),
    K("precision", "auto", "auto (bf16 on GPUs and CPUs with native bf16, else fp32), bf16 autocast, fp16 autocast "
      "+ GradScaler, or fp32", ("auto", "bf16", "fp16", "fp32"), resume=CHANGE),
    K("compile", False, "torch.compile the student and teacher forward", resume=FREE),
    "runtime",
    K("device", "auto", "auto (cuda:<local rank> if a GPU is visible, else cpu), cpu, cuda", resume=FREE),
    K("seed", 0, "base seed; rank r uses seed + r", ge=0, le=2**31 - 1),
    K("output_dir", "output/pretrain", "checkpoints, log.txt, TensorBoard, exported backbones", resume=FREE),
    K("save_every_steps", 500, "also checkpoint every N steps (0 = only at epoch ends)", ge=0, resume=FREE),
    K("keep_checkpoints", 2, "checkpoints kept (checkpoint.pth, checkpoint.1.pth, ...): a corrupt one falls back",
      ge=1, resume=FREE),
    K("max_save_failures", 3, "consecutive failed checkpoint writes (disk full, ...) before the run stops", ge=1,
      resume=FREE),
    K("allow_resume_change", "", "comma list of keys a resume may change, e.g. epochs or epochs,lr (the knobs "
      "marked changeable); any other change is refused", resume=FREE),
    K("log_every", 10, "progress line, log.txt and TensorBoard every N steps", ge=1, resume=FREE),
    K("pca_every_epochs", 5, "TensorBoard PCA image of student vs teacher patch features (0 = off)", ge=0,
      resume=FREE),
    K("max_bad_steps", 20, "fp16: consecutive scaler-skipped / non-finite steps tolerated before stopping", ge=0,
      resume=FREE),
    K("dist_timeout_min", 30, "collective timeout in minutes", ge=1, resume=FREE),
    K("wandb", "", "W&B project that also gets the TensorBoard scalars and images (optional package)", resume=FREE),
    K("monitor_knn", "", "TRAIN_DIR,VAL_DIR: kNN top-1 of the EMA student every --monitor-every epochs", resume=FREE),
    K("monitor_every", 1, "epochs between two --monitor-knn probes (pretrain/monitor.py)", ge=1, resume=FREE),
)

# The rest of the imports sit below the table, which is what a reader of this file comes for (ruff: E402 off here)
import json
import logging
import os
import sys

import torch

from common import optim
from common.dist import DistInfo, cleanup, init_distributed
from common.errors import cli
from common.log import setup_logging
from . import config, monitor, resume
from . import state as ckpt_state
from .data import build_data
from .engine import EXIT_PREEMPTED, PREEMPT_SIGNALS, PreemptionFlag, StopTraining, Trainer
from .losses import ProteusDistiller, TargetSpec
from .masking import MaskGenerator
from .students import StudentRun, build_student_module, init_seed, seeded, student_specs
from .targets import TargetNormaliser, fit_teacher_norm

log = logging.getLogger("pretrain")


def parse_config(argv=None) -> dict:
    return vars(config.build_parser(KNOBS, "pretrain.main", __doc__.split("\n\n")[0]).parse_args(argv))


# ==========================================================================================================
# The method: teachers, students + heads, optimisation and schedule (data: pretrain/data.py)
# ==========================================================================================================
def build_teachers(cfg, device: torch.device) -> tuple[dict, dict]:
    """({name: frozen Teacher} in --teacher order, on `device`, in their weight dtype; {name: its objectives})."""
    teachers = {}
    for t in config.teacher_list(cfg):
        teacher = models.build_teacher(t["name"], t["checkpoint"] or None, img_size=cfg["input_size"],
                                       summary_index=t["summary_index"])
        teacher.to(device)
        dtype = config.teacher_weight_dtype(cfg, device)
        if dtype != torch.float32:
            teacher.to(dtype)
        if cfg["compile"]:
            teacher.backbone.compile()
        teachers[t["name"]] = teacher
        if not teacher.patch_targets:
            log.info("%s: token objective only (its patch tokens get no training signal)", t["name"])
    return teachers, {k: list(config.objectives_of(cfg, t.patch_targets)) for k, t in teachers.items()}


def distillation_grid(cfg, teachers: dict) -> tuple[int, int]:
    """The token grid every target lives on: the ViT student's patch grid, else the first teacher's."""
    if all(models.is_timm_name(s.arch) for s in student_specs(cfg)):
        p = next(iter(teachers.values())).patch_size
    else:  # a ViT student's patch grid (timm students resample their feature map onto it)
        p = cfg["patch_size"]
    return cfg["input_size"] // p, cfg["input_size"] // p


def build_student_run(cfg, spec, teachers: dict, grid: tuple[int, int], info: DistInfo) -> StudentRun:
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
    run = StudentRun(spec, distiller, model, *build_optimisation(cfg, distiller, lr_scaled), lr_scaled)
    n_params, mem = sum(p.numel() for p in distiller.parameters() if p.requires_grad), run.memory_mib()
    log.info("student %s (%s%s) on a %dx%d grid + heads %s: %.2fM trainable parameters, lr %.3g; holds %.0f MiB "
             "(params %.0f, grads %.0f, AdamW %.0f, EMA %.0f); teachers %s", spec.key, spec.arch,
             f", {spec.kwargs}" if spec.kwargs else "", *grid, json.dumps(cfg["objectives"]), n_params / 1e6,
             lr_scaled, sum(mem.values()), mem["params"], mem["grads"], mem["adamw"], mem["ema"],
             ", ".join(f"{k} (summary {t.summary_dim}-d, patch tokens {t.embed_dim}-d, patch {t.patch_size})"
                       for k, t in teachers.items()))
    return run


def build_distiller(cfg, spec, teachers: dict, grid: tuple[int, int]) -> ProteusDistiller:
    student = build_student_module(spec, cfg)
    weights = {t["name"]: t["weight"] for t in config.teacher_list(cfg)}
    # each part its own width: the token head predicts the summary (C-RADIO's: k x D), the others the patches
    targets = [TargetSpec(k, t.embed_dim, tuple(cfg["objectives"][k]), weights[k], cls_dim=t.summary_dim)
               for k, t in teachers.items()]
    return ProteusDistiller(student, targets, config.lambdas_of(cfg), grid)


def build_optimisation(cfg, distiller, lr_scaled: float):
    """(AdamW, per-iteration schedule, grad scaler, EMA of the student backbone or None)."""
    groups = optim.param_groups(distiller, cfg["weight_decay"], cfg["decay_tokens"])
    fused = {"auto": None, "on": True, "off": False}[cfg["fused_adamw"]]
    optimizer = optim.build_adamw(groups, lr_scaled, cfg["opt_betas"], cfg["opt_eps"], fused)
    scheduler = build_schedule(cfg, optimizer, cfg["steps_per_epoch"])
    scaler = torch.amp.GradScaler(next(distiller.parameters()).device.type, enabled=cfg["precision"] == "fp16")
    ema = optim.build_ema(distiller.student, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    return optimizer, scheduler, scaler, ema


def build_schedule(cfg, optimizer, steps_per_epoch: int, start_step: int = 0):
    """Warm-up + cosine over the steps from `start_step` (a student's join step; 0 for the run's own students)
    to the end of the run."""
    left = max(cfg["epochs"] * steps_per_epoch - start_step, 1)
    return optim.build_cosine_schedule(optimizer, left, min(cfg["warmup_epochs"] * steps_per_epoch, left),
                                       cfg["min_lr"], cfg["warmup_lr"])


# ==========================================================================================================
# The outline
# ==========================================================================================================
@cli("pretrain.main")
def main(argv=None) -> int:
    cfg = parse_config(argv)
    config.validate_config(cfg, KNOBS, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(cfg["device"], cfg["dist_timeout_min"])
    try:
        resume.claim_output_dir(cfg, info)  # its lock is released by the cli boundary
        setup_logging(cfg["output_dir"], info.rank, name="pretrain")
        return train(config.derive(cfg, info), info)
    finally:
        cleanup()


def train(cfg, info: DistInfo) -> int:
    preempt = PreemptionFlag(PREEMPT_SIGNALS)  # from here on a signal means "checkpoint, then exit 75"
    try:
        ckpt, ckpt_path = resume.find_checkpoint(cfg, info)
        if ckpt is None:
            resume.prepare_fresh_start(cfg, info)
        cfg = resume.keep_recorded_workers(cfg, ckpt)
        history = resume.check_config(cfg, KNOBS, ckpt, ckpt_path)
        ckpt_state.seed_everything(cfg["seed"] + info.rank)
        data = build_data(cfg, info)  # before the teachers: the order of their RNG use
        resume.check_steps_per_epoch(ckpt, data.steps_per_epoch)
        teachers, objectives = build_teachers(cfg, info.device)
        cfg = config.freeze({**cfg, "resume_changes": history, "steps_per_epoch": data.steps_per_epoch,
                             "objectives": objectives, "teacher_summary": {k: t.summary for k, t in teachers.items()}})
        trainer = build_trainer(cfg, info, data, teachers, preempt)
        resume.restore(trainer, ckpt, ckpt_path, KNOBS, info, build_schedule)
        del ckpt
        fit_teacher_norm(trainer, cfg["teacher_norm_batches"])
        resume.write_run_config(cfg, info, ckpt_path)
        return run(trainer, cfg, info)
    finally:
        preempt.restore()


def build_trainer(cfg, info: DistInfo, data, teachers: dict, preempt: PreemptionFlag) -> Trainer:
    """Students + heads and their optimisation, then masks, in the order their RNG use requires."""
    grid = distillation_grid(cfg, teachers)  # (gh, gw): every target of every student lives on it
    students = [build_student_run(cfg, spec, teachers, grid, info) for spec in student_specs(cfg)]
    masked_view = students[0].distiller.masked_view  # the same objectives for every student
    mask_gen = MaskGenerator(grid[0] * grid[1], cfg["mask_probability"] if masked_view else 0.0,
                             cfg["mask_ratio"], seed=cfg["seed"] + info.rank)
    metrics = monitor.metric_logger(cfg, info.is_main)  # log.txt + TensorBoard (+ W&B with --wandb)
    grids = {k: (cfg["input_size"] // t.patch_size,) * 2 for k, t in teachers.items()}
    # PHI-S per (teacher, part), fitted on the first batches (fit_teacher_norm)
    dims = {k: {"cls": t.summary_dim, "patch": t.embed_dim} for k, t in teachers.items()}
    return Trainer(cfg, info, students, teachers, mask_gen, data.loader, data.generator, data.steps_per_epoch,
                   metrics, pca_batch=data.pca_batch, preempt=preempt, grids=grids,
                   normaliser=TargetNormaliser(dims) if cfg["teacher_norm"] == "phi-s" else None)


def run(trainer: Trainer, cfg, info: DistInfo) -> int:
    try:
        trainer.train()
        resume.export_students(trainer, cfg, info)
        return 0
    except StopTraining as stop:
        (log.warning if stop.exit_code == EXIT_PREEMPTED else log.error)("%s", stop)
        return stop.exit_code
    finally:
        trainer.metrics.close()


if __name__ == "__main__":
    sys.exit(main())
