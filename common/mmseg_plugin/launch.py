"""The train / test entry points shared by segmentation/ and depth/ (mmseg's tools/train.py and test.py).

    python -m segmentation.train CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
    python -m segmentation.test CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node=N -m segmentation.train CONFIG ...   (GPU: nccl, CPU: gloo)

The plugin package is imported first, so the mmcv.ops shim precedes every mmseg model import.
What a user can get wrong (a missing config, data root, checkpoint or backbone file, a bad
--cfg-options key, a work dir that is another tool's or not writable) is checked before the Runner
is built and raised as a UserError (one message, exit 2 through `common.errors.cli`).
"""
import argparse
import glob
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.dist import is_main_process
from mmengine.runner import Runner

from common.dist import init_distributed
from common.errors import ConfigError, MissingFileError
from common.log import write_json
from common.mmseg_plugin.compat import mmengine_checkpoint_globals
from common.rundir import claim_run_dir, write_config

# What the entry points write at the top of a work dir (mmengine's own files go in timestamped subdirs)
WORK_DIR_FILES = ("config.json",)
CONFIG_SUFFIXES = (".py", ".yml", ".yaml", ".json")  # what mmengine's Config.fromfile reads


class _Runner(Runner):
    """mmengine's Runner, with its checkpoint types allow-listed for its own loads (resume, load_from) only."""

    def load_or_resume(self) -> None:
        with mmengine_checkpoint_globals():
            super().load_or_resume()


def _parser(task: str, mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {task}.{mode}", description=f"{task} {mode} (mmseg)")
    parser.add_argument("config", help="config file, e.g. segmentation/configs/...py")
    if mode == "test":
        parser.add_argument("checkpoint", help="mmengine checkpoint written by training (iter_*.pth / best_*.pth)")
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<task>/<config name>)")
    if mode == "train":
        parser.add_argument("--resume", nargs="?", const="auto", default=None,
                            help="resume from the latest checkpoint in the work dir, or from the given file")
        parser.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. model.backbone.checkpoint=path train_cfg.max_iters=10")
    return parser


def load_config(args, task: str) -> Config:
    """Config file + --cfg-options + work dir + launcher; distributed init happens here."""
    cfg = read_config(args.config, task)
    try:
        cfg.merge_from_dict(args.cfg_options)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--cfg-options {args.cfg_options} do not fit {args.config}: {e}") from e
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("work_dirs", task, name)
    if init_distributed().distributed:
        cfg.launcher = "pytorch"  # the process group already exists, so mmengine does not init it again
        if cfg.get("model_wrapper_cfg") is None:
            cfg.model_wrapper_cfg = dict(type="DeviceAwareDDP",
                                         find_unused_parameters=cfg.get("find_unused_parameters", False))
    return cfg


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


def claim_work_dir(cfg: Config, task: str, args, mode: str) -> None:
    """Refuse another tool's work dir; mark ours (config.json: tool, config, argv) on the main process."""
    cfg.work_dir = claim_run_dir(cfg.work_dir, task, files=WORK_DIR_FILES)
    marker = osp.join(cfg.work_dir, "config.json")
    if is_main_process() and (mode == "train" or not osp.exists(marker)):
        write_config(cfg.work_dir, task, {"mode": mode, "config": osp.abspath(args.config),
                                          "cfg_options": args.cfg_options, "argv": sys.argv})


def run_train(task: str, argv=None) -> None:
    args = _parser(task, "train").parse_args(argv)
    cfg = load_config(args, task)
    check_inputs(cfg, ("train_dataloader", "val_dataloader") if cfg.get("val_cfg") else ("train_dataloader",), task)
    check_file(cfg.model.backbone.get("checkpoint"), "backbone checkpoint (model.backbone.checkpoint)",
               "pass --cfg-options model.backbone.checkpoint=PATH (None = random init)")
    if args.resume not in (None, "auto"):
        check_file(args.resume, "--resume checkpoint", "pass a file written by this training (iter_<N>.pth), or "
                                                       "--resume alone for the latest in the work dir")
    claim_work_dir(cfg, task, args, "train")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None  # mmengine finds the latest checkpoint in work_dir
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    _Runner.from_cfg(cfg).train()


def run_test(task: str, argv=None) -> dict:
    """Evaluate CHECKPOINT on the config's test set; writes `test_metrics.json` into the work dir."""
    args = _parser(task, "test").parse_args(argv)
    check_file(args.checkpoint, "checkpoint", f"pass a file written by `python -m {task}.train`, e.g. "
                                              f"<work_dir>/iter_<N>.pth")
    cfg = load_config(args, task)
    check_inputs(cfg, ("test_dataloader",), task)
    claim_work_dir(cfg, task, args, "test")
    cfg.load_from = args.checkpoint
    metrics = _Runner.from_cfg(cfg).test()
    metrics = {k: float(v) for k, v in metrics.items()}  # numpy float32 is not JSON serialisable
    if is_main_process():
        write_json(osp.join(cfg.work_dir, "test_metrics.json"),
                   dict(config=args.config, checkpoint=args.checkpoint, metrics=metrics))
    return metrics
