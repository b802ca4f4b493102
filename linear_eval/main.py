"""ImageNet linear probe (DINOv2 protocol), kNN, and robustness sets. torchrun-ready, resumable.

    torchrun --nproc_per_node=4 -m linear_eval.main --train-root IN/train --val-root IN/val \
        --pretrained output/proteus_small_dinov2      # -> output/proteus_small_dinov2/eval/linear/results.json

--pretrained takes the pretraining run dir (arch, size overrides, patch and image size come from its
config.json; flags that contradict it are refused; --student KEY with several students), its checkpoint.pth,
an exported backbone, or any accepted file with --arch etc. (common/backbone_flags.py).

Linear mode trains 52 heads at once on the frozen backbone (last 1 / 4 blocks' CLS, with / without the
mean patch token, x 13 lrs) with SGD + cosine per iteration, evaluates them periodically and writes the
best head's top-1/top-5 to results.json. `--selection val` picks the head on val and reports val (the
DINOv2 protocol); `--selection train-holdout` picks it on a held-out part of train and reports val.
A run directory with a checkpoint.pth resumes where it stopped, and refuses to when the backbone
(weights, EMA, arch, size, image size) or the grid set-up differs. `--mode knn`: DINO's weighted kNN.
"""
import argparse
import json
import logging
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import models
from common import dist, probe
from common.backbone_flags import add_backbone_args, resolve_backbone
from common.checkpoint import load_latest
from common.data import LAYOUT_HELP, collate_skip_bad, seed_worker
from common.errors import ConfigError, DataError, MissingFileError, cli
from common.log import MetricLogger, setup_logging, write_json
from common.precision import CHOICES as PRECISIONS, autocast_dtype, resolve_precision
from common.rundir import claim_run_dir, write_config
from linear_eval import engine, knn, robustness
from linear_eval.data import ResumableSampler, View, eval_transform, holdout_indices, open_folder, train_transform
from linear_eval.grid import DEFAULT_LRS, LinearHeadGrid, build_grid_optimizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("linear_eval")
TOOL = "linear_eval"
ROBUSTNESS_SETS = ("imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "imagenet-c")


def get_args_parser():
    from common.config import ConfigArgumentParser  # -c/--config FILE

    p = ConfigArgumentParser("Linear probe / kNN on frozen features", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-root", required=True, help="ImageFolder of training images (ImageNet: .../train)")
    g.add_argument("--val-root", required=True, help="ImageFolder of val images in the same class folders")
    g.add_argument("--batch-size", type=int, default=128, help="per-process batch (lr scales with the global one)")
    g.add_argument("--num-workers", type=int, default=8)
    g.add_argument("--selection", default="val", choices=("val", "train-holdout"),
                   help="pick the best head on val (DINOv2) or on a held-out part of train")
    g.add_argument("--holdout-fraction", type=float, default=0.01, help="part of train held out for selection")
    g = add_backbone_args(p)  # eval resizes to image size * 256/224, then crops it
    g.add_argument("--autocast", dest="precision", type=lambda v: "fp32" if v == "none" else v, choices=PRECISIONS,
                   help="old name of --precision ('none' = fp32)")
    g = p.add_argument_group("linear probe")
    g.add_argument("--mode", default="linear", choices=("linear", "knn"))
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--epoch-length", type=int, default=None, help="iterations per epoch (default: one pass over train)")
    g.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="base lrs (x global batch / 256)")
    g.add_argument("--n-last-blocks", type=int, nargs="+", default=None,
                   help="CLS tokens of the last n blocks per head (default: 1 and 4; timm archs: 1 only)")
    g.add_argument("--eval-period", type=int, default=1250, help="evaluate all heads every N iterations")
    g.add_argument("--checkpoint-period", type=int, default=1250, help="save heads + optimizer every N iterations")
    g.add_argument("--knn-k", type=int, nargs="+", default=[10, 20])
    g.add_argument("--knn-temperature", type=float, default=0.07)
    g = p.add_argument_group("robustness (evaluated with the chosen head when given)")
    for name in ROBUSTNESS_SETS:
        g.add_argument(f"--{name}", default=None, help=f"root of {name} (layouts: linear_eval/robustness.py)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="default: RUN/eval/[<student>/][step<N>/]{linear|knn}[_ema] of the run --pretrained names")
    g.add_argument("--device", default="auto")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Command line, checked before any work: every bad value is a ConfigError naming the flag."""
    args = get_args_parser().parse_args(argv)
    resolve_backbone(args, args.mode)  # the run --pretrained names: arch, sizes, patch, image size, output dir
    positive = ("image_size", "batch_size", "patch_size", "epochs", "eval_period", "checkpoint_period")
    for flag in positive + (("epoch_length",) if args.epoch_length is not None else ()):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    args.n_last_blocks = args.n_last_blocks or default_last_blocks(args.arch, args.model_kwargs)
    for flag, values in (("lrs", args.lrs), ("n-last-blocks", args.n_last_blocks), ("knn-k", args.knn_k)):
        if not all(v > 0 for v in values):
            raise ConfigError(f"--{flag} must all be > 0, got {values}")
    if not 0 < args.holdout_fraction < 1 or not args.knn_temperature > 0:
        raise ConfigError(f"need 0 < --holdout-fraction < 1 and --knn-temperature > 0, got "
                          f"{args.holdout_fraction} and {args.knn_temperature}")
    probe.check_model_kwargs(args.arch, args.model_kwargs)
    if models.is_timm_name(args.arch) and args.n_last_blocks != [1]:
        raise ConfigError(f"--arch {args.arch} gives only its final features (timm stages differ in width): "
                          f"--n-last-blocks must be 1, got {args.n_last_blocks}")
    for flag in ("train_root", "val_root"):  # before the output dir is created
        if not os.path.isdir(getattr(args, flag)):
            raise MissingFileError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such directory; "
                                   f"{LAYOUT_HELP}")
    for name in ROBUSTNESS_SETS:  # fail now, not after training
        root = getattr(args, name.replace("-", "_"))
        if root and not os.path.isdir(root):
            raise MissingFileError(f"--{name} {root}: no such directory (layouts: linear_eval/robustness.py)")
    return args


def default_last_blocks(arch: str, model_kwargs: dict | None = None) -> list[int]:
    """DINOv2's grid uses the last 1 and 4 blocks (all blocks of a shallower ViT, e.g. a depth-2 test run);
    a timm backbone has only its final features."""
    if models.is_timm_name(arch):
        return [1]
    depth = (model_kwargs or {}).get("depth") if isinstance(model_kwargs, dict) else None
    if not isinstance(depth, int) or depth < 1:
        depth = models.VIT_SIZES[arch][1] if arch in models.VIT_SIZES else 4
    return sorted({1, min(4, depth)})


def init_distributed(requested: str) -> dist.DistInfo:
    try:
        dist.resolve_device(requested)  # a bad --device is the user's: check it before the process group
    except (RuntimeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return dist.init_distributed(requested)


def build_data(args):
    """Train (augmented, infinite) / selection / val loaders; scans each folder once."""
    train_folder, val_folder = open_folder(args.train_root, "--train-root"), open_folder(args.val_root, "--val-root")
    check_classes(args, train_folder.classes, val_folder.classes)
    size = args.image_size
    train_idx, held_idx = range(len(train_folder)), None
    if args.selection == "train-holdout":
        train_idx, held_idx = holdout_indices(len(train_folder), args.holdout_fraction, args.seed)
        if len(held_idx) == 0 or len(train_idx) == 0:
            raise DataError(f"--holdout-fraction {args.holdout_fraction} of {len(train_folder)} training images "
                            f"holds out {len(held_idx)}; raise it or use --selection val")
    loaders = {"val": eval_loader(View(val_folder, range(len(val_folder)), eval_transform(size)), args)}
    if held_idx is not None:
        loaders["train-holdout"] = eval_loader(View(train_folder, held_idx, eval_transform(size)), args)
    train_view = View(train_folder, train_idx, train_transform(size))
    return train_folder.classes, train_view, loaders


def check_classes(args, train: list, val: list) -> None:
    """The probe needs two or more classes, and val must use train's class folders (targets are indices)."""
    if len(train) < 2:
        raise DataError(f"--train-root {args.train_root} has {len(train)} class folder(s) ({train}); a linear "
                        f"probe needs at least 2 (one class would score 100 % trivially)")
    if val != train:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DataError(f"--val-root {args.val_root} must have the same class folders as --train-root "
                        f"{args.train_root} ({len(val)} vs {len(train)}; only in train: {only_train[:5]}, "
                        f"only in val: {only_val[:5]})")


def eval_loader(dataset, args):
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=robustness.eval_sampler(dataset),
                                       num_workers=args.num_workers, collate_fn=_drop_bad)


def train_loader(dataset, args, info, start_iter):
    sampler = ResumableSampler(len(dataset), info.rank, info.world_size, args.seed, start=start_iter * args.batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                       num_workers=args.num_workers, collate_fn=_drop_bad, worker_init_fn=seed_worker,
                                       pin_memory=info.device.type == "cuda",
                                       persistent_workers=args.num_workers > 0,
                                       # own generator: creating the iterator must not draw from the global
                                       # RNG, whose state the checkpoint restores for the augmentations
                                       generator=torch.Generator().manual_seed(args.seed + start_iter))


def _drop_bad(batch):
    collated, n_bad = collate_skip_bad(batch)
    if n_bad:
        log.warning("skipped %d unreadable images in a batch", n_bad)
    return collated


def run_knn(args, info, backbone, classes, train_view, loaders, amp):
    """kNN on train (eval transform) vs val; writes results.json."""
    train_folder = train_view.folder  # already scanned by build_data: no second pass over the train tree
    bank = probe.IndexedDataset(View(train_folder, range(len(train_folder)), eval_transform(args.image_size)))
    val = probe.IndexedDataset(loaders["val"].dataset)
    res = knn.knn_eval(backbone, _indexed_loader(bank, args), _indexed_loader(val, args), len(classes),
                          info.device, ks=args.knn_k, temperature=args.knn_temperature, autocast_dtype=amp)
    for k, v in res.items():
        log.info("kNN %s: top-1 %.2f  top-5 %.2f", k, v["top1"], v["top5"])
    return {"mode": "knn", "temperature": args.knn_temperature, **res}


def _indexed_loader(dataset, args):
    """(image, target, index) batches for feature extraction; shards by rank under torchrun."""
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=robustness.eval_sampler(dataset),
                                       num_workers=args.num_workers)


def linear_plan(args, info, classes, train_view) -> dict:
    """The run's set-up as recorded in (and compared with) its checkpoint; the backbone by content."""
    global_batch = args.batch_size * info.world_size
    epoch_length = args.epoch_length or max(len(train_view) // global_batch, 1)
    backbone = probe.backbone_identity(args.pretrained, args.arch, args.patch_size, args.model_kwargs, args.ema,
                                       img_size=args.image_size, student=args.student)
    return {"arch": args.arch, "num_classes": len(classes), "lrs": list(args.lrs), "global_batch": global_batch,
            "n_last_blocks": list(args.n_last_blocks), "max_iter": args.epochs * epoch_length,
            "epoch_length": epoch_length, "selection": args.selection, "backbone": backbone,
            "pretrained": args.pretrained}


def resume_state(output_dir: str, meta: dict):
    """(checkpoint or None, its path); refuses, before the backbone loads, one made by another set-up."""
    state, path = load_latest(output_dir)
    if state is not None:
        engine.check_meta(state.get("meta", {}), meta, path)
    return state, path


def run_linear(args, info, backbone, classes, train_view, loaders, amp, metric_logger, meta, resume):
    """Train the grid (resuming from `resume` = (state, path) if any), then report the head chosen by --selection."""
    grid = LinearHeadGrid(backbone.embed_dim, len(classes), tuple(args.n_last_blocks), (False, True),
                          tuple(args.lrs), patch_dim=backbone.patch_dim).to(info.device)  # timm: dims may differ
    global_batch, max_iter = meta["global_batch"], meta["max_iter"]
    opt, sched = build_grid_optimizer(grid, global_batch, max_iter)
    state, path = resume
    start_iter, history = 0, []
    if state is not None:
        start_iter, history = engine.restore_state(state, grid, opt, sched, meta), state["history"]
        log.info("resumed from %s at iteration %d / %d", path, start_iter, max_iter)
    log.info("%d heads, global batch %d, %d iterations (%d per epoch), lr x %.3g", len(grid.configs), global_batch,
             max_iter, meta["epoch_length"], global_batch / 256)
    model = DistributedDataParallel(grid, device_ids=[info.device] if info.device.type == "cuda" else None) \
        if info.distributed else grid

    scores_at = {}  # iteration -> all heads' selection scores (the final one is reused by report)

    def evaluate(it):
        scores = scores_at[it] = engine.evaluate_grid(backbone, model, loaders[args.selection], info.device, amp,
                                                      desc=args.selection)
        name = engine.best_head(scores)
        log.info("it %d: best head on %s %s top-1 %.2f", it, args.selection, name, scores[name]["top1"])
        metric_logger.log(it, prefix=f"{args.selection}/", top1=scores[name]["top1"], top5=scores[name]["top5"])
        return {"best_head": name, **scores[name]}

    if start_iter < max_iter:
        history += engine.train_grid(backbone, model, opt, sched, train_loader(train_view, args, info, start_iter),
                                     info.device, start_iter, max_iter, evaluate,
                                     lambda it, h: engine.save_state(args.output_dir, grid, opt, sched, it,
                                                                     history + h, meta),
                                     args.eval_period, args.checkpoint_period, amp, metric_logger)
    return report(args, info, backbone, model, classes, loaders, amp, history, scores_at.get(max_iter))


def report(args, info, backbone, model, classes, loaders, amp, history, selection_scores=None):
    """Final selection (all heads on the selection set), the chosen head on val, robustness sets.

    `selection_scores`: the final iteration's evaluation when training just ran it (a run resumed at the
    end has none), so the selection set is not passed over twice.
    """
    if selection_scores is None:
        selection_scores = engine.evaluate_grid(backbone, model, loaders[args.selection], info.device, amp,
                                                desc=args.selection)
    name = engine.best_head(selection_scores)
    val_scores = selection_scores if args.selection == "val" else \
        engine.evaluate_grid(backbone, model, loaders["val"], info.device, amp, desc="val")
    results = {"mode": "linear", "selection": args.selection, "best_head": name,
               "top1": val_scores[name]["top1"], "top5": val_scores[name]["top5"],
               "selection_top1": selection_scores[name]["top1"], "heads_val": val_scores, "history": history}
    log.info("best head (selected on %s): %s  val top-1 %.2f  top-5 %.2f", args.selection, name,
             results["top1"], results["top5"])
    results["robustness"] = evaluate_robustness(args, info, backbone, model, classes, name, amp)
    return results


def evaluate_robustness(args, info, backbone, model, classes, head, amp) -> dict:
    """Top-1 of `head` on each given -V2/-Sketch/-R/-A root; mCE on -C."""
    transform, out = eval_transform(args.image_size), {}
    for key in ("imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a"):
        root = getattr(args, key)
        if root:
            loader, subset = robustness.build_robustness_loader(root, classes, transform, args.batch_size,
                                                                args.num_workers)
            out[key] = engine.evaluate_grid(backbone, model, loader, info.device, amp, class_subset=subset,
                                            desc=key)[head]
            log.info("%s: top-1 %.2f (%s classes)", key, out[key]["top1"], "all" if subset is None else len(subset))
    if args.imagenet_c:
        errors = {}
        for (c, s), root in robustness.corruption_folders(args.imagenet_c).items():
            loader, subset = robustness.build_robustness_loader(root, classes, transform, args.batch_size,
                                                                args.num_workers)
            top1 = engine.evaluate_grid(backbone, model, loader, info.device, amp, class_subset=subset,
                                        desc=f"imagenet_c {c}/{s}")[head]["top1"]
            errors[(c, s)] = 1.0 - top1 / 100.0
        out["imagenet_c"] = robustness.mean_corruption_error(errors)
        out["imagenet_c"]["errors"] = {f"{c}/{s}": 100.0 * e for (c, s), e in errors.items()}
        log.info("imagenet_c: mCE %.2f", out["imagenet_c"]["mCE"])
    return out


def run(argv=None) -> dict:
    """The whole evaluation; returns the results (also written to results.json). Raises UserError on bad input."""
    args = parse_args(argv)
    info = init_distributed(args.device)
    setup_logging(None, info.rank)  # console only until every check passed: a refused run leaves its dir as it was
    args.output_dir = claim_run_dir(args.output_dir, TOOL, lock=True)
    classes, train_view, loaders = build_data(args)
    meta = linear_plan(args, info, classes, train_view) if args.mode == "linear" else None
    resume = resume_state(args.output_dir, meta) if meta else (None, None)

    setup_logging(args.output_dir, info.rank, name=TOOL)
    precision, reason = resolve_precision(args.precision, info.device)
    log.info("precision %s (%s)", precision, reason)
    torch.manual_seed(args.seed)
    if info.is_main:
        write_config(args.output_dir, TOOL, {**vars(args), "precision_resolved": precision,
                                             "precision_reason": reason})
    backbone = probe.build_frozen_backbone(args.pretrained, args.arch, args.patch_size,
                                           img_size=probe.backbone_img_size(args.arch, args.image_size),
                                           model_kwargs=args.model_kwargs, ema=args.ema,
                                           student=args.student).to(info.device)
    metric_logger = MetricLogger(args.output_dir, enabled=info.is_main)  # log.txt (JSON lines) + tensorboard/
    amp = autocast_dtype(precision)
    if args.mode == "knn":
        results = run_knn(args, info, backbone, classes, train_view, loaders, amp)
    else:
        results = run_linear(args, info, backbone, classes, train_view, loaders, amp, metric_logger, meta, resume)
    # the backbone by content (its weights' hash): tools.export credits the results to the weights they came from
    identity = meta["backbone"] if meta else probe.backbone_identity(
        args.pretrained, args.arch, args.patch_size, args.model_kwargs, args.ema, img_size=args.image_size,
        student=args.student)
    results.update(arch=args.arch, pretrained=args.pretrained, image_size=args.image_size, precision=precision,
                   precision_reason=reason, ema=args.ema, student=args.student_key, run_dir=args.run_dir,
                   backbone=identity)
    log_results(metric_logger, results, meta["max_iter"] if meta else 0)
    metric_logger.close()
    if info.is_main:
        write_json(os.path.join(args.output_dir, "results.json"), results)
    dist.cleanup()
    return results


def log_results(metric_logger, results: dict, step: int) -> None:
    """The reported numbers as scalars (log.txt and TensorBoard): kNN per k, or the chosen head on val and on
    the robustness sets."""
    if results["mode"] == "knn":
        scores = {f"{k}_{m}": v[m] for k, v in results.items() if k.startswith("k") and isinstance(v, dict)
                  for m in ("top1", "top5")}
        metric_logger.log(step, prefix="knn/", **scores)
        return
    robust = {f"{k}_top1": v["top1"] for k, v in results["robustness"].items() if "top1" in v}
    if "imagenet_c" in results["robustness"]:
        robust["imagenet_c_mCE"] = results["robustness"]["imagenet_c"]["mCE"]
    metric_logger.log(step, prefix="final/", top1=results["top1"], top5=results["top5"],
                      selection_top1=results["selection_top1"], **robust)


@cli("linear_eval.main")
def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
