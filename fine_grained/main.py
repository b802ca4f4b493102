"""Fine-grained transfer: logistic regression on frozen features.

    python -m fine_grained.main --dataset cub --data-root data/cub --pretrained output/proteus_small_dinov2
        # -> output/proteus_small_dinov2/eval/fine_grained/cub/results.json; the backbone flags
        #    (common/backbone_flags.py) are read from the run; --student KEY with several students

Features (final-block CLS after the final norm; `--multiple`: last 4 CLS + mean patch token) are
extracted once per split and cached under --cache-dir (default ~/.cache/proteus/fine_grained), keyed
on everything that changes them or their labels: the checkpoint's content hash and build, every
image file's fingerprint (path, size, mtime, ctime, inode) and label, the transform, the image size
and the precision. The classifier is L2 multinomial logistic regression (per-class
binary for VOC) with z-scored features; C is swept over 45 values and chosen on val, then refit on
train+val and scored on test. `results.json` holds dataset, metric and test_score (percent).
"""
import argparse
import json
import logging
import math
import os
import sys
import time

import torch

import models
from common import probe
from common.backbone_flags import add_backbone_args, resolve_backbone
from common.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from common.dist import resolve_device
from common.errors import ConfigError, DataError, cli
from common.log import MetricLogger, setup_logging, write_json
from common.precision import autocast_dtype, resolve_precision
from common.rundir import claim_run_dir, write_config
from fine_grained.cache import backbone_fingerprint, cache_path, default_cache_dir, read_cache, write_cache
from fine_grained.datasets import DATASETS, holdout_split
from fine_grained.logreg import C_SWEEP, sweep_logreg
from fine_grained.metrics import METRICS
from models.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("fine_grained")
TOOL = "fine_grained"

# The original normalised fine-grained inputs with CLIP's statistics (Q10); kept as the default.
NORMS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
         "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
         "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def get_args_parser():
    from common.config import ConfigArgumentParser  # -c/--config FILE

    p = ConfigArgumentParser("Fine-grained logistic-regression transfer", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                   help="registry entry (fine_grained/datasets.py)")
    g.add_argument("--data-root", required=True, help="local root in the layout the dataset's error message shows")
    g.add_argument("--resize", type=int, default=None, help="short side before the crop (default: --image-size)")
    g.add_argument("--norm", default="clip", choices=sorted(NORMS), help="input normalisation (original: clip)")
    g.add_argument("--batch-size", type=int, default=32, help="feature-extraction batch size")
    g.add_argument("--num-workers", type=int, default=4)
    g = add_backbone_args(p)  # the image size is the centre crop fed to the backbone
    g.add_argument("--multiple", action="store_true", help="features = last 4 CLS tokens + mean patch token (5D)")
    g = p.add_argument_group("classifier")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (original: 1000)")
    g.add_argument("--tol", type=float, default=1e-4, help="L-BFGS stops when max |gradient| <= tol")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="default: RUN/eval/[<student>/][step<N>/]fine_grained[_ema]/<dataset> of the run --pretrained "
                        "names")
    g.add_argument("--cache-dir", default=None,
                   help="feature cache directory, shared between runs (default: $XDG_CACHE_HOME or "
                        "~/.cache, then proteus/fine_grained)")
    g.add_argument("--no-cache", action="store_true", help="always re-extract features")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Command line, checked before any work: every bad value is a ConfigError naming the flag."""
    args = get_args_parser().parse_args(argv)
    resolve_backbone(args, TOOL, args.dataset)  # the run --pretrained names: arch, sizes, patch, image size, output
    for flag in ("image_size", "batch_size", "max_iter", "patch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.resize is not None and args.resize < args.image_size:
        raise ConfigError(f"--resize {args.resize} is smaller than the --image-size {args.image_size} crop")
    if args.num_workers < 0 or not args.tol > 0:
        raise ConfigError(f"need --num-workers >= 0 and --tol > 0, got {args.num_workers} and {args.tol}")
    probe.check_model_kwargs(args.arch, args.model_kwargs)
    if args.multiple and models.is_timm_name(args.arch):
        raise ConfigError(f"--multiple needs the CLS tokens of the last 4 blocks, but --arch {args.arch} gives only "
                          f"its final features (timm stages differ in width); drop --multiple")
    args.cache_dir = args.cache_dir or default_cache_dir()
    return args


def build_splits(args):
    """Parse the dataset root (fails fast with the layout) and attach the evaluation transform."""
    spec = DATASETS[args.dataset]
    parsed = spec.load(args.data_root)
    mean, std = NORMS[args.norm]
    transform = build_eval_transform(resize=args.resize or args.image_size, crop=args.image_size, mean=mean, std=std)
    splits = {"train": parsed.train, "val": parsed.val, "test": parsed.test}
    for ds in splits.values():
        if ds is not None:
            ds.transform = transform
    if spec.num_classes and len(parsed.classes) != spec.num_classes:
        log.warning("%s has %d classes here, %d in the real dataset", args.dataset, len(parsed.classes),
                    spec.num_classes)
    splits = {k: v for k, v in splits.items() if v is not None}
    check_splits(args, parsed, splits)
    return spec, parsed, splits, transform


def check_splits(args, parsed, splits) -> None:
    """A probe needs two classes and a non-empty train / val / test: anything else is a DataError, not a score."""
    where = f"--dataset {args.dataset} --data-root {args.data_root}"
    for name, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"{where}: the {name} split is empty; check the split lists / class folders")
    if "val" not in splits and int(0.2 * len(splits["train"])) == 0:
        raise DataError(f"{where}: {len(splits['train'])} training images leave none for the 20 % validation "
                        f"split that chooses C; use at least 5")
    train_targets = splits["train"].targets
    multilabel = bool(train_targets) and isinstance(train_targets[0], torch.Tensor) and train_targets[0].dim() > 0
    present = len(parsed.classes) if multilabel else len({int(t) for t in train_targets})
    if len(parsed.classes) < 2 or present < 2:
        raise DataError(f"{where}: the training split has {present} class(es) ({len(parsed.classes)} in the "
                        f"dataset); a classifier needs at least 2, and one class would score 100 % trivially")


def split_features(args, backbone, identity: dict, splits, transform, device, precision: str,
                   metrics) -> dict:
    """Features of each split, from the cache when its key matches: {split: dict(cls, patch_mean, targets)}.

    `identity`: the backbone's `probe.backbone_identity` (the results record it too; the file is hashed once).
    Each split's image count, time and img/s go to `metrics` (log.txt and TensorBoard, under features/<split>/).
    """
    n_last = 4 if args.multiple else 1
    build_size = probe.backbone_img_size(args.arch, args.image_size)
    # the cache is keyed by the size the backbone is built at
    fingerprint = None if args.no_cache else backbone_fingerprint({**identity, "img_size": build_size})
    out = {}
    for name, ds in splits.items():
        path = None if fingerprint is None else cache_path(args, fingerprint, name, ds, transform, n_last, precision)
        cached = read_cache(path)
        if cached is not None:
            log.info("features of %s/%s from cache %s", args.dataset, name, path)
            out[name] = cached
            metrics.log(0, prefix=f"features/{name}/", images=len(ds), cached=True)
            continue
        loader = torch.utils.data.DataLoader(probe.IndexedDataset(ds), batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        t0 = time.time()
        out[name] = probe.extract_features(backbone, loader, device, n_last_blocks=n_last,
                                           autocast_dtype=autocast_dtype(precision),
                                           desc=f"features {args.dataset}/{name}")
        seconds = time.time() - t0
        log.info("extracted %s/%s: %d images in %.1fs (%.1f img/s)", args.dataset, name, len(ds), seconds,
                 len(ds) / max(seconds, 1e-9))
        metrics.log(0, prefix=f"features/{name}/", images=len(ds), cached=False, seconds=seconds,
                    img_per_s=len(ds) / max(seconds, 1e-9))
        write_cache(path, out[name])
    return out


def feature_matrix(feats: dict, multiple: bool) -> torch.Tensor:
    """(N, D): final CLS; with `multiple`: (N, 5D) = last 4 CLS + mean patch token."""
    if multiple:
        return probe.head_input(feats["cls"], feats["patch_mean"], n_last=4, avgpool=True)
    return feats["cls"][:, -1]


def protocol_sets(feats: dict, multiple: bool) -> dict:
    """train / val / trainval / test as (features, targets); 80/20 of train when there is no val split."""
    x = {k: feature_matrix(v, multiple) for k, v in feats.items()}
    y = {k: v["targets"] for k, v in feats.items()}
    sets = {"test": (x["test"], y["test"])}
    if "val" in feats:
        sets["train"], sets["val"] = (x["train"], y["train"]), (x["val"], y["val"])
        sets["trainval"] = (torch.cat([x["train"], x["val"]]), torch.cat([y["train"], y["val"]]))
    else:
        tr, va = holdout_split(len(y["train"]))
        sets["train"] = (x["train"][tr], y["train"][tr])
        sets["val"] = (x["train"][va], y["train"][va])
        sets["trainval"] = (x["train"], y["train"])  # the refit uses the full training split
    return sets


def run(argv=None) -> dict:
    """The whole evaluation; returns the results (also written to results.json). Raises UserError on bad input."""
    args = parse_args(argv)
    device = resolve_eval_device(args.device)
    setup_logging(None)  # console only until every check passed: a refused run leaves its dir as it was
    output_dir = claim_run_dir(args.output_dir, TOOL, lock=True)
    spec, parsed, splits, transform = build_splits(args)

    setup_logging(output_dir, name=TOOL)
    precision, reason = resolve_precision(args.precision, device)
    log.info("precision %s (%s)", precision, reason)
    write_config(output_dir, TOOL, {**vars(args), "precision_resolved": precision, "precision_reason": reason})
    backbone = probe.build_frozen_backbone(args.pretrained, args.arch, args.patch_size,
                                           img_size=probe.backbone_img_size(args.arch, args.image_size),
                                           model_kwargs=args.model_kwargs, ema=args.ema, student=args.student)
    # the backbone by content (its weights' hash): the feature cache's key, and tools.export credits the
    # results to those weights
    identity = probe.backbone_identity(args.pretrained, args.arch, args.patch_size, args.model_kwargs, args.ema,
                                       img_size=args.image_size, student=args.student)
    metrics = MetricLogger(output_dir)  # log.txt (JSON lines) + tensorboard/
    t0 = time.time()
    feats = split_features(args, backbone, identity, splits, transform, device, precision, metrics)
    t_feat = time.time() - t0
    sets = protocol_sets(feats, args.multiple)
    log.info("train %d / val %d / trainval %d / test %d samples, %d-d features", *(len(sets[k][1]) for k in
             ("train", "val", "trainval", "test")), sets["train"][0].shape[1])

    t0 = time.time()
    result = sweep_logreg(sets["train"], sets["val"], sets["trainval"], sets["test"], METRICS[spec.metric],
                          num_classes=len(parsed.classes), device=device, max_iter=args.max_iter, tol=args.tol)
    results = {"dataset": args.dataset, "metric": spec.metric, "test_score": result.test_score,
               "best_C": result.best_C, "best_val_score": max(result.val_scores),
               "val_scores": dict(zip((f"{c:.4g}" for c in C_SWEEP), result.val_scores)),
               "arch": args.arch, "pretrained": args.pretrained, "multiple": args.multiple, "ema": args.ema,
               "student": args.student_key, "run_dir": args.run_dir,
               "backbone": identity,
               "num_classes": len(parsed.classes), "image_size": args.image_size,
               "precision": precision, "precision_reason": reason,
               "sizes": {k: len(v[1]) for k, v in sets.items()},
               "feature_seconds": t_feat, "classifier_seconds": time.time() - t0}
    log_sweep(metrics, result)
    metrics.close()
    write_json(os.path.join(output_dir, "results.json"), results)
    log.info("Final %s for %s on %s: %.2f%% (C=%.3g)", spec.metric, args.arch, args.dataset, result.test_score,
             result.best_C)
    return results


def log_sweep(metrics, result) -> None:
    """The C sweep as scalars: sweep/val_score at step i for the i-th C of C_SWEEP (from 1e6 down), and the
    refit's test score."""
    for i, (c, score) in enumerate(zip(C_SWEEP, result.val_scores)):
        metrics.log(i, prefix="sweep/", C=c, log10_C=math.log10(c), val_score=score)
    metrics.log(0, prefix="test/", score=result.test_score, best_C=result.best_C)


def resolve_eval_device(requested: str) -> torch.device:
    try:
        return resolve_device(requested)
    except (RuntimeError, ValueError) as e:  # common.dist's plain errors: a bad --device is the user's
        raise ConfigError(str(e)) from e


@cli("fine_grained.main")
def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
