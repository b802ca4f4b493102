"""Real demo images that need no download at run time.

- Fashion-MNIST from the Debian package `dataset-fashion-mnist` (the four original IDX `.gz` files in
  /usr/share/datasets/fashion-mnist/), written as RGB ImageFolders `train/<class>/*.png` and
  `test/<class>/*.png`, upsampled so a patch-14 ViT sees a useful grid (112 px -> 8x8 patches).
- A few natural photos bundled inside the scikit-image wheel, for the PCA patch-feature figure.

    python -m demo.assets --out data/fashion_mnist --train-per-class 500 --test-per-class 100 --size 112

Class folders are prefixed with the official label index (`0_tshirt_top` ... `9_ankle_boot`) so that
torchvision's ImageFolder, which sorts folder names, gives every class its official label.
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

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# IDX magic numbers: 0x08 = unsigned byte data, last byte = number of dimensions
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}
DONE_MARKER = ".complete.json"

# skimage.data photos that ship inside the scikit-image wheel (no pooch download)
NATURAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def class_folder_names() -> list[str]:
    """`0_tshirt_top` ... `9_ankle_boot`: sorted order equals the official label order."""
    return [f"{i}_{name}" for i, name in enumerate(FASHION_MNIST_CLASSES)]


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file (uint8 data) with `ndim` dimensions: images (N, 28, 28) or labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise ValueError(f"{path}: IDX magic {magic:#010x}, expected {IDX_MAGIC[ndim]:#010x} "
                         f"(a uint8 array with {ndim} dimension(s)); is the file corrupt?")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    header = 4 + 4 * ndim  # 16 bytes for images, 8 for labels
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {len(data) - header} bytes; truncated file?")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_paths(split: str, src: str = FASHION_MNIST_DIR) -> tuple[str, str]:
    """(images.gz, labels.gz) for `split`, or a FileNotFoundError naming the apt package to install."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(FASHION_MNIST_FILES)}")
    paths = tuple(os.path.join(src, name) for name in FASHION_MNIST_FILES[split])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST file(s) not found: {', '.join(missing)}. They come from the "
                                f"Debian package {FASHION_MNIST_APT}: run `apt-get update && apt-get install -y "
                                f"{FASHION_MNIST_APT}` (or pass --src DIR holding the four IDX .gz files).")
    return paths


def select_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` samples of each class, chosen by a seeded shuffle, returned sorted.

    The same seed gives nested subsets (the first n of each class's permutation), so a bigger demo
    reuses the images of a smaller one.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise ValueError(f"asked for {per_class} images of class {c}, but the split has only {len(idx)}")
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen))


def to_rgb(image: np.ndarray, size: int) -> Image.Image:
    """(28, 28) uint8 grayscale -> (size, size) RGB, bicubic upsampling."""
    return Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def _split_settings(split: str, per_class: int, size: int, seed: int, src: str) -> dict:
    return {"split": split, "per_class": per_class, "size": size, "seed": seed, "source": os.path.abspath(src)}


def _is_complete(split_dir: str, settings: dict) -> bool:
    """True when `split_dir` was written with exactly these settings; an error if it was written otherwise."""
    marker = os.path.join(split_dir, DONE_MARKER)
    if not os.path.exists(split_dir):
        return False
    if not os.path.isfile(marker):
        raise FileExistsError(f"{split_dir} exists but was not written by demo.assets (no {DONE_MARKER}); "
                              f"choose another --out or remove it")
    with open(marker) as f:
        found = json.load(f)
    if found != settings:
        raise FileExistsError(f"{split_dir} holds a different subset {found}, not {settings}; "
                              f"choose another --out or remove that folder to rebuild it")
    return True


def write_split(out: str, split: str, per_class: int, size: int = 112, seed: int = 0,
                src: str = FASHION_MNIST_DIR) -> str:
    """Write `out/<split>/<class>/<split>_<index>.png` for a per-class subset; skip if already complete.

    The split is built in a temporary folder next to `out` and renamed into place, so an interrupted run
    never leaves a half-written folder that a later run would mistake for a finished one.
    Returns the split folder.
    """
    settings = _split_settings(split, per_class, size, seed, src)
    split_dir = os.path.join(out, split)
    if _is_complete(split_dir, settings):
        return split_dir
    images_gz, labels_gz = fashion_mnist_paths(split, src)
    images, labels = read_idx(images_gz, 3), read_idx(labels_gz, 1)  # (N, 28, 28), (N,)
    if len(images) != len(labels):
        raise ValueError(f"{images_gz} has {len(images)} images but {labels_gz} has {len(labels)} labels")
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=out)
    try:
        folders = class_folder_names()
        for name in folders:
            os.makedirs(os.path.join(tmp, name))
        for i in select_per_class(labels, per_class, seed):
            to_rgb(images[i], size).save(os.path.join(tmp, folders[labels[i]], f"{split}_{i:05d}.png"))
        with open(os.path.join(tmp, DONE_MARKER), "w") as f:
            json.dump(settings, f)
        os.replace(tmp, split_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return split_dir


def prepare_fashion_mnist(out: str, train_per_class: int, test_per_class: int, size: int = 112, seed: int = 0,
                          src: str = FASHION_MNIST_DIR) -> dict:
    """Write both ImageFolders under `out`; returns {"train": dir, "test": dir}.

    Train images are what the student is distilled on (labels unused); test images carry the labels the
    probe is trained and scored on.
    """
    return {"train": write_split(out, "train", train_per_class, size, seed, src),
            "test": write_split(out, "test", test_per_class, size, seed, src)}


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
    parser = argparse.ArgumentParser("Fashion-MNIST (Debian package) -> RGB ImageFolders for the demo")
    parser.add_argument("--out", required=True, help="output folder; train/ and test/ are written inside")
    parser.add_argument("--train-per-class", type=int, default=500, help="train images per class (10 classes)")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (10 classes)")
    parser.add_argument("--size", type=int, default=112, help="side in pixels after bicubic upsampling from 28")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class subset selection")
    parser.add_argument("--src", default=FASHION_MNIST_DIR, help="folder with the four IDX .gz files")
    return parser


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    start = time.time()
    dirs = prepare_fashion_mnist(args.out, args.train_per_class, args.test_per_class, args.size, args.seed, args.src)
    for split, path in dirs.items():
        n = sum(len(files) for _, _, files in os.walk(path)) - 1  # minus the marker
        print(f"{split}: {n} images in {path}")
    print(f"done in {time.time() - start:.1f}s")
    return dirs


if __name__ == "__main__":
    main()
