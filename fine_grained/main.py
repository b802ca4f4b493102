"""Fine-grained transfer: logistic regression on frozen features (spec §3.2).

    python -m fine_grained.main --dataset cub --data-root data/cub --arch vit_small \
        --pretrained output/pretrain/student_backbone.pth --output-dir output/fg/cub

Features (final-block CLS after the final norm; `--multiple`: last 4 CLS + mean patch token) are
extracted once per split and cached under --cache-dir, keyed by the checkpoint's content hash, the
dataset, its root and the transform. The classifier is L2 multinomial logistic regression (per-class
binary for VOC) with z-scored features; C is swept over 45 values and chosen on val, then refit on
train+val and scored on test. `results.json` holds dataset, metric and test_score (percent).
"""
import argparse
import json
import logging
import os
import time

import torch

from common import probe
from common.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from common.dist import resolve_device
from common.log import setup_logging, write_json
from fine_grained.datasets import DATASETS, holdout_split
from fine_grained.metrics import METRICS
from models.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("fine_grained")

# The original normalised fine-grained inputs with CLIP's statistics (Q10); kept as the default.
NORMS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
         "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
         "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def get_args_parser():
    p = argparse.ArgumentParser("Fine-grained logistic-regression transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                   help="registry entry (fine_grained/datasets.py)")
    g.add_argument("--data-root", required=True, help="local root in the layout the dataset's error message shows")
    g.add_argument("--image-size", type=int, default=224, help="centre-crop size fed to the backbone")
    g.add_argument("--resize", type=int, default=None, help="short side before the crop (default: --image-size)")
    g.add_argument("--norm", default="clip", choices=sorted(NORMS), help="input normalisation (original: clip)")
    g.add_argument("--batch-size", type=int, default=32, help="feature-extraction batch size")
    g.add_argument("--num-workers", type=int, default=4)
    g = p.add_argument_group("backbone")
    g.add_argument("--arch", default="vit_small", help="vit_tiny | vit_small | vit_base | vit_large | vit_giant2")
    g.add_argument("--patch-size", type=int, default=14)
    g.add_argument("--pretrained", default="none", help="checkpoint path, or 'none' for the random-init baseline")
    g.add_argument("--ema", action="store_true", help="evaluate the EMA student of a pretrain checkpoint")
    g.add_argument("--model-kwargs", type=json.loads, default=None,
                   help='JSON size overrides for small models, e.g. \'{"depth": 2, "embed_dim": 64, "num_heads": 2}\'')
    g.add_argument("--multiple", action="store_true", help="features = last 4 CLS tokens + mean patch token (5D)")
    g = p.add_argument_group("classifier")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (original: 1000)")
    g.add_argument("--tol", type=float, default=1e-4, help="L-BFGS stops when max |gradient| <= tol")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--cache-dir", default="cache_features", help="feature cache directory (shared between runs)")
    g.add_argument("--no-cache", action="store_true", help="always re-extract features")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


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
    return spec, parsed, {k: v for k, v in splits.items() if v is not None}, transform


def split_features(args, backbone, splits, transform, device) -> dict:
    """Features of each split, from the cache when its key matches: {split: dict(cls, patch_mean, targets)}."""
    n_last = 4 if args.multiple else 1
    # the fingerprint hashes the checkpoint file: only worth it when the cache is used
    fingerprint = None if args.no_cache else probe.backbone_fingerprint(args.pretrained, args.arch, args.patch_size,
                                                                         args.model_kwargs, args.ema)
    out = {}
    for name, ds in splits.items():
        path = None
        if fingerprint is not None:
            key = probe.cache_key(fingerprint, args.dataset, os.path.abspath(args.data_root), name, len(ds),
                                  repr(transform), n_last)
            path = os.path.join(args.cache_dir, f"{args.dataset}_{name}_{key}.pt")
        if path is not None and os.path.isfile(path):
            log.info("features of %s/%s from cache %s", args.dataset, name, path)
            out[name] = torch.load(path, map_location="cpu", weights_only=True)
            continue
        loader = torch.utils.data.DataLoader(probe.IndexedDataset(ds), batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        t0 = time.time()
        out[name] = probe.extract_features(backbone, loader, device, n_last_blocks=n_last)
        log.info("extracted %s/%s: %d images in %.1fs", args.dataset, name, len(ds), time.time() - t0)
        if path is not None:
            probe.save_features(path, out[name])
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


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(args.output_dir, name="fine_grained")
    write_json(os.path.join(args.output_dir, "config.json"), vars(args))
    device = resolve_device(args.device)

    spec, parsed, splits, transform = build_splits(args)
    backbone = probe.build_frozen_backbone(args.pretrained, args.arch, args.patch_size, img_size=224,
                                           model_kwargs=args.model_kwargs, ema=args.ema)
    t0 = time.time()
    feats = split_features(args, backbone, splits, transform, device)
    t_feat = time.time() - t0
    sets = protocol_sets(feats, args.multiple)
    log.info("train %d / val %d / trainval %d / test %d samples, %d-d features", *(len(sets[k][1]) for k in
             ("train", "val", "trainval", "test")), sets["train"][0].shape[1])

    t0 = time.time()
    result = probe.sweep_logreg(sets["train"], sets["val"], sets["trainval"], sets["test"], METRICS[spec.metric],
                                num_classes=len(parsed.classes), device=device, max_iter=args.max_iter, tol=args.tol)
    results = {"dataset": args.dataset, "metric": spec.metric, "test_score": result.test_score,
               "best_C": result.best_C, "best_val_score": max(result.val_scores),
               "val_scores": dict(zip((f"{c:.4g}" for c in probe.C_SWEEP), result.val_scores)),
               "arch": args.arch, "pretrained": args.pretrained, "multiple": args.multiple,
               "num_classes": len(parsed.classes), "image_size": args.image_size,
               "sizes": {k: len(v[1]) for k, v in sets.items()},
               "feature_seconds": t_feat, "classifier_seconds": time.time() - t0}
    write_json(os.path.join(args.output_dir, "results.json"), results)
    log.info("Final %s for %s on %s: %.2f%% (C=%.3g)", spec.metric, args.arch, args.dataset, result.test_score,
             result.best_C)
    return results


if __name__ == "__main__":
    main()
