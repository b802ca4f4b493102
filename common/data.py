"""Image-folder datasets that fail early on a wrong layout and skip broken files mid-run.

The layout every classification / pretraining root uses is torchvision's ImageFolder:
    root/<class_name>/<image>.{jpg,jpeg,png,...}
(ImageNet: root = .../train with the 1000 `n0...` wnid folders).
"""
import logging
import os
import warnings

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT_HELP = ("expected an ImageFolder layout: ROOT/<class_name>/<image>.jpg (ImageNet: ROOT=.../train "
               "with one folder per wnid). Extensions: " + ", ".join(IMG_EXTENSIONS))


def check_image_folder(root: str, what: str = "dataset") -> None:
    """Raise a clear error (before any heavy work) if `root` is not a non-empty ImageFolder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} root {root!r} does not exist or is not a directory; {LAYOUT_HELP}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        loose = [e.name for e in os.scandir(root) if e.is_file()][:3]
        hint = f" (found loose files such as {loose}: put them in class sub-folders)" if loose else ""
        raise ValueError(f"{what} root {root!r} has no class sub-folders{hint}; {LAYOUT_HELP}")
    for c in classes:
        for _, _, files in os.walk(os.path.join(root, c), followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return
    raise ValueError(f"{what} root {root!r} has {len(classes)} class folders but no image files; {LAYOUT_HELP}")


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images yield None instead of crashing the epoch.

    on_bad_image="skip": the sample is returned as None (dropped by `collate_skip_bad`, which counts
    it) and a warning names the file; "fail": the error is raised with the file path.
    """

    def __init__(self, root: str, transform=None, on_bad_image: str = "skip", **kwargs):
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        check_image_folder(root)
        super().__init__(root, transform=transform, **kwargs)
        self.on_bad_image = on_bad_image

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")  # forces the full decode: truncated files fail here
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
            if self.on_bad_image == "fail":
                raise RuntimeError(f"unreadable image {path}: {e} (use --on-bad-image skip to skip it)") from e
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=1)
            return None
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def collate_skip_bad(batch: list):
    """default_collate over the readable samples; returns (collated or None, number skipped)."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    return (default_collate(good) if good else None), n_bad


def build_eval_transform(resize: int = 256, crop: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the short side (bicubic), centre-crop, normalise: the standard ImageNet evaluation view."""
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy/random seeds from torch's per-worker seed (reproducible)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
