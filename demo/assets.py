"""Real demo images that need no download at run time.

- Fashion-MNIST from the Debian package `dataset-fashion-mnist` (the four original IDX `.gz` files in
  /usr/share/datasets/fashion-mnist/), written as RGB ImageFolders `train/<class>/*.png` and
  `test/<class>/*.png`, upsampled so a patch-14 ViT sees a useful grid (56 px -> 4x4 patches).
- The transfer set: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, 1,797
  8x8 images in 17 grey levels, shipped inside the scikit-learn wheel), as the same kind of ImageFolders.
  The demo never distils or tunes on it.
- A few natural photos bundled inside the scikit-image wheel, for the PCA patch-feature figure.

    python -m demo.assets --out data/fashion_mnist --train-per-class 500 --test-per-class 100 --size 56
    python -m demo.assets --dataset digits --out data/digits --train-per-class 80 --test-per-class 90 --size 56

Class folders are prefixed with the official label index (`0_tshirt_top` ... `9_ankle_boot`, `0_digit`
... `9_digit`) so that torchvision's ImageFolder, which sorts folder names, gives every class its label.
A finished split folder holds DONE_MARKER with the settings it was written with; a folder without it is
never written into.
"""
import argparse
import gzip
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from common.errors import ConfigError, DataError, MissingFileError, cli

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# IDX magic numbers: 0x08 = unsigned byte data, last byte = number of dimensions
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}
DONE_MARKER = ".complete.json"

DIGITS_SOURCE = "sklearn.datasets.load_digits"
DIGITS_LEVELS = 16  # load_digits pixels are counts 0..16 of ink in a 4x4 block of the 32x32 original
DIGITS_MIN_PER_CLASS = 174  # the rarest digit (8) has 174 images: train + test per class must fit

# skimage.data photos that ship inside the scikit-image wheel (no pooch download)
NATURAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def class_folder_names() -> list[str]:
    """`0_tshirt_top` ... `9_ankle_boot`: sorted order equals the official label order."""
    return [f"{i}_{name}" for i, name in enumerate(FASHION_MNIST_CLASSES)]


def digit_folder_names() -> list[str]:
    """`0_digit` ... `9_digit`: sorted order equals the digit."""
    return [f"{i}_digit" for i in range(10)]


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file (uint8 data) with `ndim` dimensions: images (N, 28, 28) or labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise DataError(f"{path}: IDX magic {magic:#010x}, expected {IDX_MAGIC[ndim]:#010x} "
                         f"(a uint8 array with {ndim} dimension(s)); is the file corrupt?")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    header = 4 + 4 * ndim  # 16 bytes for images, 8 for labels
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {len(data) - header} bytes; truncated file?")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_paths(split: str, src: str = FASHION_MNIST_DIR) -> tuple[str, str]:
    """(images.gz, labels.gz) for `split`, or a FileNotFoundError naming the apt package to install."""
    if split not in FASHION_MNIST_FILES:
        raise ConfigError(f"unknown split {split!r}; expected one of {sorted(FASHION_MNIST_FILES)}")
    paths = tuple(os.path.join(src, name) for name in FASHION_MNIST_FILES[split])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f"Fashion-MNIST file(s) not found: {', '.join(missing)}. They come from the "
                                f"Debian package {FASHION_MNIST_APT}: run `apt-get update && apt-get install -y "
                                f"{FASHION_MNIST_APT}` (or pass --src DIR holding the four IDX .gz files).")
    return paths


def select_per_class(labels: np.ndarray, per_class: int, seed: int, skip: int = 0) -> np.ndarray:
    """Indices of `per_class` samples of each class, chosen by a seeded shuffle, returned sorted.

    The same seed gives nested subsets (the first n of each class's permutation), so a bigger demo
    reuses the images of a smaller one. `skip` leaves out the first `skip` of each permutation: with the
    same seed, `skip=n_train` gives a test subset disjoint from the train subset of one labelled set.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        if skip + per_class > len(idx):
            raise ConfigError(f"asked for {skip + per_class} images of class {c}, but the split has only "
                              f"{len(idx)}; ask for fewer per class")
        chosen.append(rng.permutation(idx)[skip:skip + per_class])
    return np.sort(np.concatenate(chosen))


def to_rgb(image: np.ndarray, size: int) -> Image.Image:
    """(h, w) uint8 grayscale (28x28 Fashion-MNIST, 8x8 digits) -> (size, size) RGB, bicubic upsampling."""
    return Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def _split_settings(split: str, per_class: int, size: int, seed: int, src: str) -> dict:
    return {"split": split, "per_class": per_class, "size": size, "seed": seed, "source": os.path.abspath(src)}


def _is_complete(split_dir: str, settings: dict) -> bool:
    """True when `split_dir` was written with exactly these settings; an error if it was written otherwise."""
    marker = os.path.join(split_dir, DONE_MARKER)
    if not os.path.exists(split_dir):
        return False
    if not os.path.isfile(marker):
        raise ConfigError(f"{split_dir} exists but was not written by demo.assets (no {DONE_MARKER}); "
                          f"choose another --out/--data-dir or remove it")
    with open(marker) as f:
        found = json.load(f)
    if found != settings:
        raise ConfigError(f"{split_dir} holds a different subset {found}, not {settings}; "
                          f"choose another --out/--data-dir or remove that folder to rebuild it")
    return True


def _write_folder(split_dir: str, settings: dict, images: np.ndarray, labels: np.ndarray, chosen: np.ndarray,
                  folders: list[str], size: int, prefix: str) -> str:
    """Write images[chosen] as `split_dir/<folders[label]>/<prefix>_<index>.png`, then DONE_MARKER.

    Built in a temporary folder next to `split_dir` and renamed into place, so an interrupted run never
    leaves a half-written folder that a later run would mistake for a finished one.
    """
    parent = os.path.dirname(split_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(split_dir)}.tmp-", dir=parent)
    try:
        for name in folders:
            os.makedirs(os.path.join(tmp, name))
        for i in chosen:
            to_rgb(images[i], size).save(os.path.join(tmp, folders[labels[i]], f"{prefix}_{i:05d}.png"))
        with open(os.path.join(tmp, DONE_MARKER), "w") as f:
            json.dump(settings, f)
        os.replace(tmp, split_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return split_dir


def write_split(out: str, split: str, per_class: int, size: int = 112, seed: int = 0,
                src: str = FASHION_MNIST_DIR) -> str:
    """Write `out/<split>/<class>/<split>_<index>.png` for a per-class subset; skip if already complete.

    Returns the split folder.
    """
    settings = _split_settings(split, per_class, size, seed, src)
    split_dir = os.path.join(out, split)
    if _is_complete(split_dir, settings):
        return split_dir
    images_gz, labels_gz = fashion_mnist_paths(split, src)
    images, labels = read_idx(images_gz, 3), read_idx(labels_gz, 1)  # (N, 28, 28), (N,)
    if len(images) != len(labels):
        raise DataError(f"{images_gz} has {len(images)} images but {labels_gz} has {len(labels)} labels")
    return _write_folder(split_dir, settings, images, labels, select_per_class(labels, per_class, seed),
                         class_folder_names(), size, split)


def prepare_fashion_mnist(out: str, train_per_class: int, test_per_class: int, size: int = 112, seed: int = 0,
                          src: str = FASHION_MNIST_DIR) -> dict:
    """Write both ImageFolders under `out`; returns {"train": dir, "test": dir}.

    Train images are what the student is distilled on (labels unused); test images carry the labels the
    probe is trained and scored on.
    """
    return {"train": write_split(out, "train", train_per_class, size, seed, src),
            "test": write_split(out, "test", test_per_class, size, seed, src)}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ((1797, 8, 8) uint8 white-on-black like Fashion-MNIST, (1797,) labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingFileError("the digits transfer set ships inside scikit-learn: "
                               "pip install -r requirements.txt") from err
    digits = load_digits()  # read from the wheel's own files (sklearn/datasets/data/digits.csv.gz)
    images = np.round(digits.images * (255.0 / DIGITS_LEVELS)).astype(np.uint8)  # ink 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


def prepare_digits(out: str, train_per_class: int, test_per_class: int, size: int = 56, seed: int = 0) -> dict:
    """The transfer set's `out/train` and `out/test` ImageFolders: disjoint, seeded per-class subsets.

    load_digits has no official split; each class's images are shuffled with `seed`, the first
    `train_per_class` go to train/ and the next `test_per_class` to test/.
    """
    import sklearn

    if train_per_class + test_per_class > DIGITS_MIN_PER_CLASS:
        raise ConfigError(f"digits: {train_per_class} train + {test_per_class} test per class is more than the "
                          f"{DIGITS_MIN_PER_CLASS} images of its rarest class; ask for fewer")
    images = labels = None
    dirs = {}
    for split, n, skip in (("train", train_per_class, 0), ("test", test_per_class, train_per_class)):
        settings = {"split": split, "per_class": n, "skip": skip, "size": size, "seed": seed,
                    "source": f"{DIGITS_SOURCE} (scikit-learn {sklearn.__version__})"}
        split_dir = os.path.join(out, split)
        if not _is_complete(split_dir, settings):
            if images is None:
                images, labels = load_digits_arrays()
            _write_folder(split_dir, settings, images, labels, select_per_class(labels, n, seed, skip=skip),
                          digit_folder_names(), size, split)
        dirs[split] = split_dir
    return dirs


def natural_photos(names=NATURAL_PHOTOS) -> dict:
    """A few natural RGB photos bundled in scikit-image (no download), as PIL images keyed by name."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("natural_photos needs scikit-image: pip install -r requirements.txt") from err
    photos = {}
    for name in names:
        loader = getattr(data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no photo {name!r}; choose from {NATURAL_PHOTOS}")
        array = loader()  # (H, W, 3) uint8 (rocket/astronaut/coffee/chelsea are all RGB)
        photos[name] = Image.fromarray(array).convert("RGB")
    return photos


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("demo.assets", description="Fashion-MNIST (Debian package) or scikit-learn's "
                                     "digits -> RGB ImageFolders for the demo")
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"))
    parser.add_argument("--out", required=True, help="output folder; train/ and test/ are written inside")
    parser.add_argument("--train-per-class", type=int, default=500, help="train images per class (10 classes)")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (10 classes)")
    parser.add_argument("--size", type=int, default=56, help="side in pixels after bicubic upsampling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class subset selection")
    parser.add_argument("--src", default=FASHION_MNIST_DIR, help="Fashion-MNIST: folder with the four IDX .gz files")
    return parser


@cli("demo.assets")
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.time()
    if args.dataset == "digits":
        dirs = prepare_digits(args.out, args.train_per_class, args.test_per_class, args.size, args.seed)
    else:
        dirs = prepare_fashion_mnist(args.out, args.train_per_class, args.test_per_class, args.size, args.seed,
                                     args.src)
    for split, path in dirs.items():
        n = sum(len(files) for _, _, files in os.walk(path)) - 1  # minus the marker
        print(f"{split}: {n} images in {path}")
    print(f"done in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
