"""Image-folder datasets that fail early on a wrong layout and skip broken files mid-run.

The layout every classification / pretraining root uses is torchvision's ImageFolder:
    root/<class_name>/<image>.{jpg,jpeg,png,...}
(ImageNet: root = .../train with the 1000 `n0...` wnid folders).
"""
import logging
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.errors import ConfigError, DataError, MissingFileError

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
    empty = [c for c in classes if not _has_image(os.path.join(root, c))]
    if len(empty) == len(classes):
        raise ValueError(f"{what} root {root!r} has {len(classes)} class folders but no image files; {LAYOUT_HELP}")
    if empty:
        shown = ", ".join(empty[:5]) + (f", ... ({len(empty)} in all)" if len(empty) > 5 else "")
        raise DataError(f"{what} root {root!r}: class folder(s) without any image: {shown}. Remove them or add "
                        f"images (every folder under the root is a class)")


def _has_image(folder: str) -> bool:
    """True at the first image file found below `folder` (stops early: cheap on large classes)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


class BadImageError(DataError, RuntimeError):
    """An image that cannot be used, with on_bad_image="fail" (a RuntimeError too, as it always was)."""


# A decompression bomb is a small file that decodes to a huge image. PIL warns above its limit and fails
# only above twice it; here any image above the limit is a bad image, skipped or failed like a broken file.
_max_image_pixels = Image.MAX_IMAGE_PIXELS  # PIL's default: 89,478,485 (about 9459 x 9459)
_CURRENT_LIMIT = object()

# what PIL raises for broken, truncated or oversized files (the warning too, for runs with -W error)
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def set_max_image_pixels(n: int | None) -> None:
    """Images with more than `n` pixels are bad images from now on (None: no limit), PIL's guard included."""
    global _max_image_pixels
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"the image pixel limit must be a positive integer (or None for no limit), got {n!r}")
    _max_image_pixels = n
    Image.MAX_IMAGE_PIXELS = n  # PIL's own check then warns above n and fails above 2n: never before ours


def load_rgb(path: str, max_pixels=_CURRENT_LIMIT) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB: a truncated file fails here, not later in a transform.

    An image above `max_pixels` (default: the `set_max_image_pixels` limit) raises DecompressionBombError
    before it is decoded. 16-bit and float images are scaled to 8 bits, not clipped (see `_to_rgb8`).
    """
    return _to_rgb8(open_image(path, max_pixels))


def open_image(path: str, max_pixels=_CURRENT_LIMIT) -> Image.Image:
    """Read a file and open it without decoding (header only), with load_rgb's pixel limit: for transforms
    that decode only what they need (`transform.decodes`: pretrain/pipeline.py FastDeiTTransform.decode)."""
    with open(path, "rb") as f:
        data = f.read()
    return open_image_bytes(data, path, max_pixels)


def open_image_bytes(data: bytes, name: str = "", max_pixels=_CURRENT_LIMIT) -> Image.Image:
    """open_image on bytes already read (a tar shard's member). `name` becomes the image's `filename`, so
    that a transform that decodes later (on the GPU: pretrain/pipeline.py) can name the file it fails on."""
    import io

    limit = _max_image_pixels if max_pixels is _CURRENT_LIMIT else max_pixels
    hint = (f"images above {limit} pixels are refused as possible decompression bombs; if it is genuine, "
            f"raise the limit (--max-image-pixels)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own guard (at twice its limit) came first
        raise Image.DecompressionBombError(f"{e} ({hint})") from e
    if limit is not None and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"{img.width}x{img.height} = {img.width * img.height} pixels ({hint})")
    img.filename = name
    return img


def _to_rgb8(img: Image.Image) -> Image.Image:
    """PIL's convert("RGB") clips 16-bit and float values to 0..255: 16-bit mid-grey comes out white, a float
    image in [0, 1] black. Scale them instead: 16-bit (and 32-bit int, as PNG decoders give) by 1/257,
    floats in [0, 1] by 255, other floats clipped to [0, 255]."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if grey.size and grey.max() <= 1.0:
            grey = grey * 255.0
    else:
        return img.convert("RGB")
    grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


class _SafeLoading:
    """__getitem__ over `self.samples` [(path, target)] whose unreadable images yield None (see SafeImageFolder)."""

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        lazy = getattr(self.transform, "decodes", False)  # decodes only the crop's scale (pretrain/pipeline.py)
        try:
            img = self.transform.decode(open_image(path, self.max_pixels)) if lazy else load_rgb(path, self.max_pixels)
        except BAD_IMAGE_ERRORS as e:
            if self.on_bad_image == "fail":
                raise BadImageError(f"unreadable image {path}: {e} (use --on-bad-image skip to skip it)") from e
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=1)
            return None
        if self.transform is not None:
            img = self.transform(img)
        if getattr(self, "target_transform", None) is not None:
            target = self.target_transform(target)
        return img, target


class SafeImageFolder(_SafeLoading, datasets.ImageFolder):
    """ImageFolder whose unreadable images yield None instead of crashing the epoch.

    on_bad_image="skip": the sample is returned as None (dropped by `collate_skip_bad`, which counts
    it) and a warning names the file; "fail": BadImageError with the file path. Unreadable includes
    images above the pixel limit, which is taken when the dataset is built (so that DataLoader workers
    started by spawn use it too).
    """

    def __init__(self, root: str, transform=None, on_bad_image: str = "skip", **kwargs):
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        check_image_folder(root)
        super().__init__(root, transform=transform, **kwargs)
        self.on_bad_image, self.max_pixels = on_bad_image, _max_image_pixels


class ImageListDataset(_SafeLoading, torch.utils.data.Dataset):
    """Unlabelled images for pretraining (label 0): a flat folder of images, or a text file of paths.

    A list file holds one path per line (absolute, or relative to the file's folder; blank lines and
    lines starting with # are skipped). Same bad-image handling as SafeImageFolder.
    """

    def __init__(self, source: str, transform=None, on_bad_image: str = "skip"):
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        paths = list_images(source)
        self.samples = self.imgs = [(p, 0) for p in paths]
        self.targets, self.classes = [0] * len(paths), ["images"]
        self.transform, self.on_bad_image, self.max_pixels = transform, on_bad_image, _max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)


def list_images(source: str) -> list[str]:
    """The image paths of a flat folder (sorted) or of a list file, checked to be non-empty."""
    if os.path.isdir(source):
        paths = sorted(e.path for e in os.scandir(source) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    else:
        base = os.path.dirname(os.path.abspath(source))
        try:
            with open(source, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first path
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except UnicodeDecodeError as e:
            raise DataError(f"{source} is not a text file of image paths (one per line): {e}; {PRETRAIN_LAYOUTS}") \
                from None
        paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MissingFileError(f"{source}: {len(missing)} of {len(paths)} listed images do not exist "
                                   f"(first: {missing[0]})")
    if not paths:
        raise DataError(f"{source} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return paths


PRETRAIN_LAYOUTS = ("an ImageFolder ROOT/<class>/<image>, a flat folder ROOT/<image>, a text file listing image "
                    "paths (one per line), or tar shards 'DIR/shards-{000000..000127}.tar'")


def pretrain_source_kind(path: str) -> str:
    """'imagefolder', 'flat' or 'list' for a pretraining --data-path (labels are never used); raises otherwise.

    Tar shards are recognised by pretrain.shards.is_shard_spec before this is called.
    """
    if os.path.isfile(path):
        list_images(path)  # read now: a binary file or missing images fail here, before any work
        return "list"
    if not os.path.isdir(path):
        raise MissingFileError(f"--data-path {path!r} does not exist; expected {PRETRAIN_LAYOUTS}")
    entries = list(os.scandir(path))
    loose = sum(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)
    if loose:
        classes = sorted(e.name for e in entries if e.is_dir() and _has_image(e.path))
        if classes:  # either reading would silently drop the other part
            shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
            raise DataError(f"--data-path {path!r} mixes {loose} loose images at its top with {len(classes)} "
                            f"sub-folder(s) of images ({shown}): it is neither a flat folder nor an ImageFolder. "
                            f"Move the loose images into a sub-folder of their own (ImageFolder) or the sub-folders' "
                            f"images to the top (flat folder), or list every image in a text file")
        return "flat"
    check_image_folder(path, "--data-path")
    return "imagefolder"


def describe_source(path: str, kind: str, dataset) -> str:
    """What a --data-path was read as, for the log: '<path>: ImageFolder, 1281167 images in 1000 class folders'."""
    if kind == "imagefolder":
        return f"{path}: ImageFolder, {len(dataset.samples)} images in {len(dataset.classes)} class folders"
    what = "list file" if kind == "list" else "flat folder (no class sub-folders)"
    return f"{path}: {what}, {len(dataset.samples)} images"


def collate_skip_bad(batch: list, collate_images=default_collate):
    """Collate the readable (image, target) samples; returns ([images, targets] or None, number skipped).

    `collate_images`: the transform's own collate where its samples are not same-shape tensors (the GPU path's
    JPEG bytes differ in length: pretrain/pipeline.py GpuDeiTPipeline.collate)."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    if not good:
        return None, n_bad
    images, *rest = zip(*good)
    return [collate_images(list(images)), *(default_collate(list(r)) for r in rest)], n_bad


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


# ----------------------------------------------------------------------------------------------------------
# Training data: DeiT augmentation, proxy-dataset subsets, samplers that resume mid-epoch
# ----------------------------------------------------------------------------------------------------------
DEIT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"


def build_train_transform(input_size: int = 224, auto_augment: str | None = DEIT_AUTO_AUGMENT,
                          re_prob: float = 0.25, interpolation: str = "bicubic", mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, scale: tuple[float, float] = (0.08, 1.0)):
    """DeiT's training view via timm's factory.

    RandomResizedCrop(scale 0.08-1 by default, bicubic) -> hflip -> RandAugment (timm disables ColorJitter whenever
    auto_augment is set) -> ToTensor -> Normalize -> RandomErasing(p=re_prob, mode "pixel", 1 region).
    """
    from timm.data import create_transform

    return create_transform(input_size, is_training=True, auto_augment=auto_augment or None,
                            color_jitter=0.3, interpolation=interpolation, re_prob=re_prob, re_mode="pixel",
                            re_count=1, mean=mean, std=std, scale=tuple(scale))


class SingleImageDataset(torch.utils.data.Dataset):
    """The paper's "ImageNet-Single": `length` independently augmented views of one image, label 0."""

    def __init__(self, path: str, length: int, transform=None):
        if not os.path.isfile(path):
            raise MissingFileError(f"single image {path!r} does not exist")
        try:
            self.image = load_rgb(path)
        except BAD_IMAGE_ERRORS as e:
            raise BadImageError(f"unreadable single image {path}: {e}") from e
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        img = self.transform(self.image) if self.transform is not None else self.image
        return img, 0


def subsample_image_folder(ds: datasets.ImageFolder, class_fraction: float = 1.0,
                           images_per_class: float = 0, seed: int = 0) -> datasets.ImageFolder:
    """Proxy datasets of the paper's ablations, in place and identical on every rank (seeded).

    class_fraction: keep this fraction of the classes (at least one). images_per_class: 0 keeps all,
    a value in (0, 1) keeps that fraction of every class, a value >= 1 keeps that many per class.
    """
    import random

    if not 0 < class_fraction <= 1:
        raise ValueError(f"class fraction must be in (0, 1], got {class_fraction}")
    if images_per_class < 0:
        raise ValueError(f"images per class must be >= 0 (0 = all), got {images_per_class}")
    rng = random.Random(seed)
    n_keep = max(1, round(class_fraction * len(ds.classes)))
    keep_classes = set(rng.sample(range(len(ds.classes)), n_keep)) if n_keep < len(ds.classes) else None
    by_class: dict[int, list] = {}
    for path, target in ds.samples:
        if keep_classes is None or target in keep_classes:
            by_class.setdefault(target, []).append((path, target))
    samples = []
    for target in sorted(by_class):
        items = by_class[target]
        if images_per_class:
            n = int(images_per_class) if images_per_class >= 1 else max(1, round(images_per_class * len(items)))
            items = sorted(rng.sample(items, min(n, len(items))))
        samples.extend(items)
    ds.samples = ds.imgs = samples
    ds.targets = [t for _, t in samples]
    return ds


def build_pretrain_dataset(roots: list[str], transform, on_bad_image: str = "skip", class_fraction: float = 1.0,
                           images_per_class: float = 0, single_image: str = "", single_image_length: int = 0,
                           seed: int = 0):
    """One root (ImageFolder, flat folder or list file), several merged (labels unused), a proxy subset of
    them, or a single image."""
    if single_image:
        return SingleImageDataset(single_image, single_image_length, transform)
    parts = []
    for r in roots:
        kind = pretrain_source_kind(r)
        ds = (SafeImageFolder(r, transform=transform, on_bad_image=on_bad_image)
              if kind == "imagefolder" else ImageListDataset(r, transform, on_bad_image))
        log.info("data: %s", describe_source(r, kind, ds))
        parts.append(subsample_image_folder(ds, class_fraction, images_per_class, seed))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps an epoch-seeded sampler so an epoch can start after the first `n` indices (mid-epoch resume).

    The wrapped sampler's order must depend only on (seed, epoch), as RepeatAugSampler's and
    DistributedSampler's do; then skipping the consumed indices reproduces the rest of the epoch.
    """

    def __init__(self, sampler):
        self.sampler, self._skip = sampler, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self._skip = skip

    def __iter__(self):
        import itertools

        return itertools.islice(iter(self.sampler), self._skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


def build_train_sampler(dataset, world_size: int = 1, rank: int = 0, repeats: int = 3,
                        seed: int = 0) -> ResumableSampler:
    """DeiT's repeated-augmentation sampler (timm RepeatAugSampler) under DDP when repeats > 1, else a
    seeded per-epoch shuffle split over ranks (torch DistributedSampler, also for a world of one)."""
    from timm.data.distributed_sampler import RepeatAugSampler
    from torch.utils.data import DistributedSampler

    if world_size > 1 and repeats > 1:
        base = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats)
    else:
        base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return ResumableSampler(base)
