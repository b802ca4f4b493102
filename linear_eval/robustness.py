"""Robustness sets for the chosen linear head (paper Table 7): ImageNet-V2, -Sketch, -R, -A and -C.

Layouts (all class folders; no files are downloaded):
    -V2:      ROOT/<0..999>/<image>  (folder = class index in sorted-wnid order) or ROOT/<wnid>/...
    -Sketch:  ROOT/<wnid>/<image>                      (1000 classes)
    -R, -A:   ROOT/<wnid>/<image>                      (200 classes each: logits restricted to them)
    -C:       ROOT/<corruption>/<severity 1-5>/<wnid>/<image>
Folders are mapped onto the training classes by wnid (or integer index); a set covering only part of
them (-R, -A) is scored with the logits of its own classes only, the standard 200-class protocol.
"""
import logging
import os

import torch

from common.data import collate_skip_bad
from common.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

# AlexNet's top-1 error per corruption, averaged over the 5 severities (Hendrycks & Dietterich, 2019):
# mCE normalises each corruption's error by these.
ALEXNET_ERROR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


def class_mapping(folder_classes: list, train_classes: list) -> dict:
    """{folder class index: training class index}, matching by wnid, else by integer folder name."""
    index = {c: i for i, c in enumerate(train_classes)}
    mapping = {}
    for i, name in enumerate(folder_classes):
        if name in index:
            mapping[i] = index[name]
        elif name.isdigit() and int(name) < len(train_classes):
            mapping[i] = int(name)
        else:
            raise DataError(f"class folder {name!r} is neither a training class (e.g. {train_classes[0]!r}) "
                             f"nor an integer class index below {len(train_classes)}")
    return mapping


def build_robustness_loader(root: str, train_classes: list, transform, batch_size: int, num_workers: int):
    """Loader over `root` with targets in the subset's order, and the subset (None = all classes)."""
    from linear_eval.data import View, open_folder  # local: data imports nothing from here (one-way graph)

    folder = open_folder(root, "robustness root")
    mapping = class_mapping(folder.classes, train_classes)
    subset = sorted(set(mapping.values()))
    if len(subset) == len(train_classes):
        target_map, class_subset = mapping, None
    else:  # position of each folder class inside the restricted logits
        pos = {c: j for j, c in enumerate(subset)}
        target_map, class_subset = {i: pos[c] for i, c in mapping.items()}, torch.tensor(subset)
    view = View(folder, range(len(folder)), transform, target_map)
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, sampler=eval_sampler(view))
    return loader, class_subset


def _collate(batch):
    batch, _ = collate_skip_bad(batch)
    return batch


def eval_sampler(dataset):
    """In-order sampler; under torchrun each rank gets a shard (padded to equal size)."""
    from common import dist

    if dist.get_world_size() > 1:
        return torch.utils.data.DistributedSampler(dataset, shuffle=False)
    return torch.utils.data.SequentialSampler(dataset)


def corruption_folders(root: str) -> dict:
    """{(corruption, severity): path} for the ImageNet-C folders present under root."""
    if not os.path.isdir(root):
        raise MissingFileError(f"--imagenet-c {root}: no such directory; expected "
                               f"ROOT/<corruption>/<1-5>/<wnid>/<image>")
    found = {}
    for c in sorted(os.listdir(root)):
        for s in range(1, 6):
            path = os.path.join(root, c, str(s))
            if os.path.isdir(path):
                found[(c, s)] = path
    if not found:
        raise MissingFileError(f"no ImageNet-C folders under {root}; expected ROOT/<corruption>/<1-5>/<wnid>/<image>")
    return found


def mean_corruption_error(errors: dict) -> dict:
    """errors {(corruption, severity): top-1 error in [0, 1]} -> per-corruption CE and mCE (percent).

    CE_c = sum_s E_{c,s} / sum_s E^AlexNet_{c,s} = mean_s E_{c,s} / ALEXNET_ERROR[c]; mCE = mean_c CE_c over
    the 15 standard corruptions present (extra corruptions are reported but not averaged).
    """
    by_c = {}
    for (c, _), e in errors.items():
        by_c.setdefault(c, []).append(e)
    ce = {c: 100.0 * (sum(v) / len(v)) / ALEXNET_ERROR[c] for c, v in by_c.items() if c in ALEXNET_ERROR}
    missing = sorted(set(ALEXNET_ERROR) - set(by_c))
    if missing:
        log.warning("ImageNet-C: %d standard corruptions missing (%s); mCE averages the others", len(missing), missing)
    return {"mCE": sum(ce.values()) / len(ce) if ce else float("nan"), "CE": ce, "missing": missing,
            "mean_error": 100.0 * sum(errors.values()) / len(errors)}
