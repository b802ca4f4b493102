"""The train / test entry points shared by segmentation/ and depth/ (mmseg's tools/train.py and test.py).

    python -m segmentation.train CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
    python -m segmentation.test CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node=N -m segmentation.train CONFIG ...   (GPU: nccl, CPU: gloo)

The plugin package is imported first, so the mmcv.ops shim precedes every mmseg model import.
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.dist import is_main_process
from mmengine.runner import Runner

from common.dist import init_distributed
from common.log import write_json


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
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("work_dirs", task, name)
    if init_distributed().distributed:
        cfg.launcher = "pytorch"  # the process group already exists, so mmengine does not init it again
        if cfg.get("model_wrapper_cfg") is None:
            cfg.model_wrapper_cfg = dict(type="DeviceAwareDDP",
                                         find_unused_parameters=cfg.get("find_unused_parameters", False))
    return cfg


def run_train(task: str, argv=None) -> None:
    args = _parser(task, "train").parse_args(argv)
    cfg = load_config(args, task)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None  # mmengine finds the latest checkpoint in work_dir
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    Runner.from_cfg(cfg).train()


def run_test(task: str, argv=None) -> dict:
    """Evaluate CHECKPOINT on the config's test set; writes `test_metrics.json` into the work dir."""
    args = _parser(task, "test").parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint} (pass a file written by "
                                f"`python -m {task}.train`, e.g. <work_dir>/iter_<N>.pth)")
    cfg = load_config(args, task)
    cfg.load_from = args.checkpoint
    metrics = Runner.from_cfg(cfg).test()
    metrics = {k: float(v) for k, v in metrics.items()}  # numpy float32 is not JSON serialisable
    if is_main_process():
        os.makedirs(cfg.work_dir, exist_ok=True)
        write_json(osp.join(cfg.work_dir, "test_metrics.json"),
                   dict(config=args.config, checkpoint=args.checkpoint, metrics=metrics))
    return metrics
