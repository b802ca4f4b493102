"""The train / test entry points shared by segmentation/ and depth/ (mmseg's tools/train.py and test.py).

    python -m segmentation.train CONFIG [--backbone RUN [--student KEY] [--ema]] [--work-dir DIR] [--resume [CKPT]]
                                 [--amp] [--scale-lr] [--dry-run] [--cfg-options k=v ...]
    python -m segmentation.test CONFIG [CHECKPOINT] [--backbone RUN ...] [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node=N -m segmentation.train CONFIG ...   (GPU: nccl, CPU: gloo)

CONFIG is a config file, or a family name (segmentation: upernet, linear; depth: dpt, dpt-frozen, linear)
with --backbone: the shipped config of that family for the run's student size.
--backbone takes a pretraining run dir, its checkpoint.pth or an exported backbone (models.run): the
run's arch, size overrides and patch size go to model.backbone (the crop stays the config's), the head
widths follow the student's width; a --cfg-options model.backbone.* value that contradicts the run is an
error naming both.

Work dirs are keyed by the backbone, so one model's checkpoints and metrics are never credited to another:
- the default work dir is RUN/eval/[<key>/][step<N>/]<task>/<config name> for a run, else
  work_dirs/<task>/<config name>/<the weights' fingerprint (common.checkpoint), or random-init>;
- the work dir's config.json records the backbone's identity (weights' fingerprint, arch, patch,
  size overrides, EMA, student); training (resumed or not) with another backbone in that dir is refused;
- test reads the identity of the work dir its checkpoint came from and writes it into test_metrics.json.

GPU count: a config named <N>xb<B> is the recipe of N processes x B images (global batch N*B). On W
processes the per-process batch becomes N*B/W so that the global batch and the learning rate stay the
recipe's; when W does not divide N*B the run is refused with the fix. --scale-lr keeps the per-process
batch instead and scales the learning rate linearly with the global batch. `--dry-run` prints the
resolved config, work dir, backbone and batch rule, and exits without writing anything.

The plugin package is imported first, so the mmcv.ops shim precedes every mmseg model import.
What a user can get wrong (a missing config, data root, checkpoint or backbone file, a bad
--cfg-options key, a work dir that is another tool's or not writable) is checked before the Runner
is built and raised as a UserError (one message, exit 2 through `common.errors.cli`).
"""
import argparse
import glob
import json
import os
import os.path as osp
import re
import sys

from mmengine.config import Config, DictAction
from mmengine.dist import is_main_process
from mmengine.runner import Runner

from common.checkpoint import file_fingerprint
from common.dist import init_distributed
from common.errors import ConfigError, MissingFileError
from common.log import write_json
from common.mmseg_plugin.compat import mmengine_checkpoint_globals
from common.rundir import claim_run_dir, write_config
from models import VIT_SIZES, is_timm_name
from models.run import RunBackbone, resolve_run

# The shipped configs per family and student size: <task>/configs/<family>_proteus-vit-<size>14_*.py
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SIZE_LETTER = {"vit_tiny": "t", "vit_small": "s", "vit_base": "b", "vit_large": "l"}
RECIPE = re.compile(r"_(\d+)xb(\d+)-")  # "4xb8" in a config name: 4 processes x 8 images
BACKBONE_KEYS = ("weights", "arch", "patch_size", "overrides", "ema", "student")  # what identifies a backbone

# What the entry points write at the top of a work dir (mmengine's logs go in timestamped subdirs; its
# checkpoints and `last_checkpoint` at the top: an unmarked dir holding them is another run's, never resumed)
WORK_DIR_FILES = ("config.json", "last_checkpoint")
CONFIG_SUFFIXES = (".py", ".yml", ".yaml", ".json")  # what mmengine's Config.fromfile reads


class _Runner(Runner):
    """mmengine's Runner, with its checkpoint types allow-listed for its own loads (resume, load_from) only."""

    def load_or_resume(self) -> None:
        with mmengine_checkpoint_globals():
            super().load_or_resume()


def _parser(task: str, mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {task}.{mode}", description=f"{task} {mode} (mmseg)")
    parser.add_argument("config", help="config file, e.g. segmentation/configs/...py, or with --backbone a family "
                                       "name (the shipped config of that family for the run's student size)")
    if mode == "test":
        parser.add_argument("checkpoint", nargs="?", default=None,
                            help="mmengine checkpoint written by training (iter_*.pth / best_*.pth); default: the "
                                 "newest best_*.pth (else iter_*.pth) of the backbone's default work dir")
    parser.add_argument("--backbone", default=None, metavar="RUN",
                        help="pretraining run dir, its checkpoint.pth or an exported backbone: arch, sizes and "
                             "weights of model.backbone (default: the config's)")
    parser.add_argument("--student", default=None, metavar="KEY", help="several-student run: the student to use")
    parser.add_argument("--ema", action="store_true", help="--backbone: the EMA student")
    parser.add_argument("--work-dir", help="output directory (default: keyed by the backbone, see the module doc)")
    if mode == "train":
        parser.add_argument("--resume", nargs="?", const="auto", default=None,
                            help="resume from the latest checkpoint in the work dir, or from the given file "
                                 "(refused when the work dir was trained with another backbone)")
        parser.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper)")
        parser.add_argument("--scale-lr", action="store_true",
                            help="on another process count than the config's <N>xb<B>: keep the per-process batch "
                                 "and scale the learning rate linearly (default: keep the global batch)")
        parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. model.backbone.checkpoint=path train_cfg.max_iters=10")
    return parser


def load_config(args, task: str) -> Config:
    """Config file + --backbone + --cfg-options + work dir + launcher; distributed init happens here."""
    run = resolve_backbone_arg(args)
    args.config = config_path(args.config, task, run)
    cfg = read_config(args.config, task)
    try:
        cfg.merge_from_dict(args.cfg_options)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--cfg-options {args.cfg_options} do not fit {args.config}: {e}") from e
    if run is not None:
        apply_backbone(cfg, run, args)
    args.identity = backbone_identity(cfg, run)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or default_work_dir(task, name, run, args.identity, args.ema)
    if init_distributed().distributed:
        cfg.launcher = "pytorch"  # the process group already exists, so mmengine does not init it again
        if cfg.get("model_wrapper_cfg") is None:
            cfg.model_wrapper_cfg = dict(type="DeviceAwareDDP",
                                         find_unused_parameters=cfg.get("find_unused_parameters", False))
    return cfg


def resolve_backbone_arg(args) -> RunBackbone | None:
    if args.backbone is None:
        if args.student or args.ema:
            raise ConfigError("--student and --ema choose within a --backbone run; pass --backbone RUN (or set "
                              "model.backbone.ema / the checkpoint in --cfg-options)")
        return None
    run = resolve_run(args.backbone, student=args.student, ema=args.ema)
    if run.arch is None:  # a file of no run: the config's arch and sizes, these weights
        return run
    if is_timm_name(run.arch):
        raise ConfigError(f"--backbone {args.backbone} trained {run.arch}; the dense launchers build our ViT "
                          f"students (ProteusViT). For a timm backbone use {'segmentation'}/configs/timm/ with "
                          f"--cfg-options for its weights")
    return run


def config_path(config: str, task: str, run: RunBackbone | None) -> str:
    """A family name with a run: the shipped config of that family for the run's student size."""
    if osp.isfile(config) or osp.splitext(config)[1] or os.sep in config:
        return config
    if run is None or run.arch is None:
        raise MissingFileError(f"config file not found: {config}; a family name ({config}) needs --backbone RUN "
                               f"(the size comes from the run), else pass a {task}/configs/*.py file")
    size = SIZE_LETTER.get(run.arch)
    folder = osp.join(REPO, task, "configs")
    found = sorted(glob.glob(osp.join(folder, f"{config}_proteus-vit-{size}14_*.py"))) if size else []
    if len(found) != 1:
        families = sorted({osp.basename(p).split("_proteus")[0] for p in glob.glob(osp.join(folder, "*.py"))})
        raise MissingFileError(f"no {task} config of family {config!r} for {run.arch}; families: "
                               f"{', '.join(families)} (sizes t, s, b, l), or pass a config file")
    return found[0]


def _width(arch: str, overrides: dict | None) -> int:
    return int((overrides or {}).get("embed_dim", VIT_SIZES[arch][0]))


def apply_backbone(cfg: Config, run: RunBackbone, args) -> None:
    """--backbone into model.backbone: weights always; arch, patch and size overrides from the run, checked
    against --cfg-options; head widths tied to the ViT width follow the student's."""
    from common.mmseg_plugin.smoke import scale_head_channels

    backbone = cfg.model.backbone
    if backbone.get("type") != "ProteusViT":
        raise ConfigError(f"{args.config} has a {backbone.get('type')} backbone; --backbone fills a ProteusViT "
                          f"(the configs of segmentation/configs and depth/configs, not configs/timm)")
    backbone.update(checkpoint=run.weights, ema=args.ema, student=run.student)
    if run.arch is None:
        return
    wanted = {"arch": run.arch, "patch_size": run.patch_size, "overrides": run.kwargs or None}
    for key, value in wanted.items():
        given = args.cfg_options.get(f"model.backbone.{key}")
        if given is not None and given != value:
            raise ConfigError(f"--cfg-options model.backbone.{key}={given} contradicts {run.describe()}, which "
                              f"trained {value}; drop it (the run's is used)")
    old = _width(backbone.get("arch", "vit_small"), backbone.get("overrides"))
    backbone.update(wanted)
    new = _width(run.arch, run.kwargs)
    if new != old:
        scale_head_channels(cfg.model, old, new)
    depth = int((run.kwargs or {}).get("depth", VIT_SIZES[run.arch][1]))
    if max(backbone.get("out_indices", [0])) >= depth:
        raise ConfigError(f"{args.config} taps blocks {list(backbone.out_indices)} but {run.describe()} has "
                          f"{depth} blocks; pass --cfg-options model.backbone.out_indices=[...] with indices < {depth}")


def backbone_identity(cfg: Config, run: RunBackbone | None) -> dict:
    """What decides the dense backbone: the weights' fingerprint and the build (arch, patch, sizes, EMA,
    student); `checkpoint` and `run_dir` are recorded to name it, not compared."""
    bb = cfg.model.get("backbone", {})
    ckpt = bb.get("checkpoint") or bb.get("checkpoint_path") or (bb.get("init_cfg") or {}).get("checkpoint")
    weights = file_fingerprint(ckpt) if isinstance(ckpt, str) and osp.isfile(ckpt) else \
        ("random-init" if ckpt in (None, "", "none", "None") else f"missing:{ckpt}")
    overrides = bb.get("overrides")
    return {"weights": weights, "arch": bb.get("arch", bb.get("model_name", bb.get("type"))),
            "patch_size": bb.get("patch_size"), "overrides": dict(overrides) if overrides else None,
            "ema": bool(bb.get("ema", False)), "student": bb.get("student"),
            "checkpoint": osp.abspath(ckpt) if isinstance(ckpt, str) and ckpt not in ("", "none", "None") else None,
            "run_dir": run.run_dir if run is not None else None}


def describe_backbone(identity: dict) -> str:
    what = identity.get("checkpoint") or "random init"
    extra = ", ".join(f"{k} {identity[k]}" for k in ("arch", "overrides", "student") if identity.get(k))
    return f"{what} ({extra}{', EMA' if identity.get('ema') else ''}; weights {str(identity['weights'])[:24]})"


def default_work_dir(task: str, name: str, run: RunBackbone | None, identity: dict, ema: bool) -> str:
    if run is not None and run.run_dir is not None:
        return osp.join(run.eval_dir(task, ema), name)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", identity["weights"])[:24]  # the weights' fingerprint, or random-init
    return osp.join("work_dirs", task, name, tag)


def check_backbone(work_dir: str, identity: dict, resuming: bool) -> None:
    """Refuse a work dir trained with another backbone (or, to resume, one that records none)."""
    marker = _read_marker(work_dir)
    if marker is None:
        return
    recorded = marker.get("backbone")
    if recorded is None:
        if resuming and glob.glob(osp.join(work_dir, "iter_*.pth")):
            raise ConfigError(f"work dir {work_dir} records no backbone (made before work dirs were keyed by it), "
                              f"so resuming there could credit another model's checkpoint; pass a new --work-dir")
        return
    if any(recorded.get(k) != identity.get(k) for k in BACKBONE_KEYS):
        raise ConfigError(f"work dir {work_dir} was trained with backbone {describe_backbone(recorded)}, this run's "
                          f"is {describe_backbone(identity)}; its checkpoints and metrics are that model's. Pass "
                          f"another --work-dir, or drop --work-dir (the default is keyed by the backbone)")


def _read_marker(work_dir: str):
    try:
        with open(osp.join(work_dir, "config.json")) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def apply_batch_rule(cfg: Config, config_name: str, world_size: int, scale_lr: bool) -> str:
    """The global batch and lr on `world_size` processes (module doc); returns the rule applied, for the log."""
    m = RECIPE.search(osp.basename(config_name))
    batch = cfg.train_dataloader.batch_size
    if m is None:
        return f"no <N>xb<B> in the config name: {world_size} x {batch} images as configured"
    recipe_n, recipe_b = int(m.group(1)), int(m.group(2))
    recipe_global = recipe_n * recipe_b
    if world_size * batch == recipe_global:
        return f"global batch {recipe_global} = {world_size} x {batch}, the recipe's"
    optimizer = cfg.optim_wrapper.optimizer
    if scale_lr:
        factor = world_size * batch / recipe_global
        optimizer.lr = optimizer.lr * factor
        return (f"--scale-lr: global batch {world_size} x {batch} = {world_size * batch} instead of the recipe's "
                f"{recipe_global}; lr x {factor:g} = {optimizer.lr:g}")
    if batch != recipe_b:  # the per-process batch was set by --cfg-options: an explicit choice, keep it
        raise ConfigError(f"train_dataloader.batch_size={batch} on {world_size} process(es) gives a global batch of "
                          f"{world_size * batch}, not the recipe's {recipe_global} ({recipe_n}x{recipe_b}); add "
                          f"--scale-lr to scale the learning rate with it, or drop the batch override")
    if recipe_global % world_size:
        raise ConfigError(f"the recipe's global batch {recipe_global} ({recipe_n}x{recipe_b}) does not divide over "
                          f"{world_size} processes; use a process count dividing {recipe_global}, or add --scale-lr "
                          f"to keep {recipe_b} per process and scale the learning rate linearly")
    cfg.train_dataloader.batch_size = recipe_global // world_size
    return (f"global batch {recipe_global} (the recipe's {recipe_n}x{recipe_b}) = {world_size} x "
            f"{recipe_global // world_size}; lr {optimizer.lr:g} unchanged")


def read_config(path: str, task: str) -> Config:
    if not osp.isfile(path):
        shipped = sorted(glob.glob(osp.join(task, "configs", "*.py")))[:3]
        raise MissingFileError(f"config file not found: {path}; pass one of {task}/configs/*.py "
                               f"(e.g. {', '.join(shipped) or 'see the README'})")
    if osp.splitext(path)[1].lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"config {path} is not an mmengine config: expected a {'/'.join(CONFIG_SUFFIXES)} file "
                          f"such as {task}/configs/*.py (a checkpoint goes in --cfg-options "
                          f"model.backbone.checkpoint=PATH, or after the config for {task}.test)")
    try:
        return Config.fromfile(path)
    except FileNotFoundError as e:  # a missing _base_ file
        raise MissingFileError(f"config {path}: {e}") from e
    except SyntaxError as e:
        raise ConfigError(f"config {path} is not valid Python: {e}") from e
    except OSError as e:  # mmengine's own refusal of a _base_ of another type, an unreadable file
        raise ConfigError(f"config {path} cannot be read: {e}") from e
    # what the config's own code raises while mmengine executes it (an undefined name, a bad _base_)
    except (NameError, ImportError, AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"config {path} failed while being executed: {type(e).__name__}: {e}") from e


def check_inputs(cfg: Config, loaders: tuple, task: str) -> None:
    """Every data root and folder the chosen dataloaders read must exist before the Runner builds."""
    for name in loaders:
        loader = cfg.get(name)
        if not loader:
            continue
        dataset = loader["dataset"]
        root = dataset.get("data_root", "")
        if root and not osp.isdir(root):
            raise MissingFileError(f"{name}.dataset.data_root {root!r} does not exist; put the dataset there or "
                                   f"pass --cfg-options {name}.dataset.data_root=PATH ({task}/README.md has the "
                                   f"layout)")
        for key, sub in (dataset.get("data_prefix") or {}).items():
            folder = osp.join(root, sub) if sub else root
            if sub and not osp.isdir(folder):
                raise MissingFileError(f"{name}: {key} folder {folder!r} does not exist; the data root "
                                       f"{root!r} is not in the layout {task}/README.md describes")


def check_file(path, what: str, fix: str) -> None:
    if path not in (None, "", "none") and not osp.isfile(path):
        raise MissingFileError(f"{what} not found: {path}; {fix}")


def claim_work_dir(cfg: Config, task: str, args, mode: str, extra: dict | None = None) -> None:
    """Refuse another tool's work dir; mark ours (config.json: tool, config, argv, backbone) on the main process."""
    cfg.work_dir = claim_run_dir(cfg.work_dir, task, files=WORK_DIR_FILES, lock=True)
    marker = osp.join(cfg.work_dir, "config.json")
    if is_main_process() and (mode == "train" or not osp.exists(marker)):
        write_config(cfg.work_dir, task, {"mode": mode, "config": osp.abspath(args.config),
                                          "cfg_options": args.cfg_options, "argv": sys.argv,
                                          "backbone": args.identity, **(extra or {})})


def run_train(task: str, argv=None) -> None:
    args = _parser(task, "train").parse_args(argv)
    cfg = load_config(args, task)
    check_inputs(cfg, ("train_dataloader", "val_dataloader") if cfg.get("val_cfg") else ("train_dataloader",), task)
    check_file(cfg.model.backbone.get("checkpoint"), "backbone checkpoint (model.backbone.checkpoint)",
               "pass --cfg-options model.backbone.checkpoint=PATH (None = random init)")
    if args.resume not in (None, "auto"):
        check_file(args.resume, "--resume checkpoint", "pass a file written by this training (iter_<N>.pth), or "
                                                       "--resume alone for the latest in the work dir")
    from mmengine.dist import get_world_size

    rule = apply_batch_rule(cfg, args.config, get_world_size(), args.scale_lr)
    if args.dry_run:
        print(cfg.pretty_text)
        print(f"# work dir: {osp.abspath(cfg.work_dir)}\n# backbone: {describe_backbone(args.identity)}\n"
              f"# batch: {rule}")
        return
    check_backbone(cfg.work_dir, args.identity, resuming=args.resume is not None)
    claim_work_dir(cfg, task, args, "train", {"batch_rule": rule})
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None  # mmengine finds the latest checkpoint in work_dir
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    _Runner.from_cfg(cfg).train()


def find_checkpoint(work_dir: str) -> str:
    """The newest best_*.pth of a training work dir, else its newest iter_*.pth."""
    for pattern in ("best_*.pth", "iter_*.pth"):
        found = sorted(glob.glob(osp.join(work_dir, pattern)), key=osp.getmtime)
        if found:
            return found[-1]
    raise MissingFileError(f"no best_*.pth or iter_*.pth in {work_dir}: train first (same --backbone and config), "
                           f"or pass the checkpoint")


def run_test(task: str, argv=None) -> dict:
    """Evaluate CHECKPOINT on the config's test set; writes `test_metrics.json` into the work dir.

    Without CHECKPOINT: the best of the backbone's default training work dir; the test work dir defaults to
    <training work dir>/test. The backbone identity recorded by that training goes into test_metrics.json.
    """
    args = _parser(task, "test").parse_args(argv)
    if args.checkpoint is not None:
        check_file(args.checkpoint, "checkpoint", f"pass a file written by `python -m {task}.train`, e.g. "
                                                  f"<work_dir>/iter_<N>.pth")
    work_dir = args.work_dir
    args.work_dir = None  # the training work dir first (where the checkpoint is)
    cfg = load_config(args, task)
    train_dir = osp.dirname(osp.abspath(args.checkpoint)) if args.checkpoint else cfg.work_dir
    args.checkpoint = args.checkpoint or find_checkpoint(train_dir)
    trained = (_read_marker(train_dir) or {}).get("backbone")
    named = args.backbone is not None or any(k.startswith("model.backbone.checkpoint") for k in args.cfg_options)
    if trained is not None and named and any(trained.get(k) != args.identity.get(k) for k in BACKBONE_KEYS):
        raise ConfigError(f"{args.checkpoint} was trained with backbone {describe_backbone(trained)}, not the one "
                          f"named here, {describe_backbone(args.identity)}; pass the matching checkpoint")
    args.identity = trained or args.identity
    cfg.work_dir = work_dir or osp.join(train_dir, "test")
    check_inputs(cfg, ("test_dataloader",), task)
    claim_work_dir(cfg, task, args, "test")
    cfg.load_from = args.checkpoint
    metrics = _Runner.from_cfg(cfg).test()
    metrics = {k: float(v) for k, v in metrics.items()}  # numpy float32 is not JSON serialisable
    if is_main_process():
        write_json(osp.join(cfg.work_dir, "test_metrics.json"),
                   dict(config=args.config, checkpoint=args.checkpoint, metrics=metrics, backbone=args.identity))
    return metrics
