"""The fine-grained datasets: one registry entry each = on-disk parsing + splits + metric.

Nothing is downloaded. Each parser reads a local root in torchvision's layout (or the original code's
format for caltech101 / sun397 / voc2007 / cub) and raises `DatasetLayoutError`, naming the expected
layout and where to get the data, when the root is missing or malformed. Parsers return file lists /
arrays, not torchvision datasets, so there are no md5 checks and no download code paths.

    python -m fine_grained.datasets make-caltech101-splits ROOT   # writes ROOT/{train,test}.txt
"""
import codecs
import hashlib
import json
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.data import BAD_IMAGE_ERRORS, check_image_folder, load_rgb
from common.errors import DataError, MissingFileError


class DatasetLayoutError(MissingFileError):
    """The dataset root is missing or not in the expected layout (the message shows the layout)."""


# ----------------------------------------------------------------------------------------------------
# Sample containers: (image, target) items, transform applied on access
# ----------------------------------------------------------------------------------------------------

class FileSamples(torch.utils.data.Dataset):
    """Images on disk: paths (N,) and targets (N,) ints or (N, K) 0/1 rows."""

    def __init__(self, paths: list, targets: list):
        self.paths, self.targets, self.transform = list(paths), list(targets), None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_rgb(self.paths[i])
        except BAD_IMAGE_ERRORS as e:  # features must stay aligned with the file list: no skipping here
            raise DataError(f"unreadable image {self.paths[i]} ({type(e).__name__}: {e}); remove it from the "
                            f"split lists or replace it") from e
        return (self.transform(img) if self.transform else img), self.targets[i]

    def fingerprint(self) -> str:
        """Changes whenever any image or label does: per file its path, size, mtime, ctime and inode.

        The inode catches what the timestamps miss: swapping two class folders by renames keeps every
        path, every label and every file's mtime and ctime, but each path then names another file.
        """
        h = hashlib.sha256()
        for path, target in zip(self.paths, self.targets):
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0"
                     f"{_label_text(target)}\n".encode())
        return h.hexdigest()


class ArraySamples(torch.utils.data.Dataset):
    """Images in memory: uint8 (N, H, W, 3) (CIFAR pickles)."""

    def __init__(self, images: np.ndarray, targets: list):
        self.images, self.targets, self.transform = images, list(targets), None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]

    def fingerprint(self) -> str:
        """Content hash of the pixels and the labels (the arrays are in memory: hashing them is cheap)."""
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(repr([_label_text(t) for t in self.targets]).encode())
        return h.hexdigest()


def _label_text(target) -> str:
    """An int class id, or a VOC (K,) 0/1 row, as text for hashing."""
    if isinstance(target, torch.Tensor):
        return ",".join(str(v) for v in target.int().tolist()) if target.dim() else str(int(target))
    return str(int(target))


@dataclass
class Parsed:
    classes: list
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None = None  # None: 20 % of train is held out (`holdout_split`)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int  # of the real dataset (synthetic test roots may have fewer)
    metric: str  # a key of fine_grained.metrics.METRICS
    parse: Callable[[str], Parsed]
    layout: str
    obtain: str

    def load(self, root: str) -> Parsed:
        try:
            return self.parse(root)
        except UnsafePickleError:
            raise  # a planted file, not a layout problem: the layout text would only distract
        # what a missing, truncated or malformed file raises in the parsers (a truncated pickle: EOFError)
        except (OSError, KeyError, ValueError, IndexError, EOFError, pickle.UnpicklingError) as e:
            if isinstance(e, DatasetLayoutError):
                problem = str(e)
            else:
                problem = f"{type(e).__name__}: {e}"
            raise DatasetLayoutError(
                f"dataset {self.name!r}: {problem}\n  --data-root {root!r} must look like:\n{self.layout}\n"
                f"  How to obtain it (nothing is downloaded at run time): {self.obtain}") from e


def holdout_split(n: int, fraction: float = 0.2, seed: int = 0):
    """The original's 80/20 split: shuffle range(n) with numpy seed 0, the first 20 % is val."""
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    k = int(np.floor(fraction * n))
    return idx[k:], idx[:k]  # (train indices, val indices)


# ----------------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------------

def _need(path: str, what: str = "") -> str:
    if not os.path.exists(path):
        raise DatasetLayoutError(f"missing {what or 'path'} {path}")
    return path


def _lines(path: str) -> list[str]:
    with open(_need(path, "file")) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _loadmat(path: str) -> dict:
    from scipy.io import loadmat  # scipy comes with scikit-learn

    return loadmat(_need(path, "file"), squeeze_me=True)


def _files(root: str, names: list, labels: list) -> FileSamples:
    paths = [os.path.join(root, n) for n in names]
    if paths:
        _need(paths[0], "image")  # the lists exist: check the images are where the lists say
    return FileSamples(paths, labels)


# ----------------------------------------------------------------------------------------------------
# One parser per dataset
# ----------------------------------------------------------------------------------------------------

def parse_aircraft(root):
    base = os.path.join(root, "fgvc-aircraft-2013b", "data")
    classes = _lines(os.path.join(base, "variants.txt"))
    index = {c: i for i, c in enumerate(classes)}
    def split(name):
        pairs = [ln.split(" ", 1) for ln in _lines(os.path.join(base, f"images_variant_{name}.txt"))]
        return _files(os.path.join(base, "images"), [f"{i}.jpg" for i, _ in pairs], [index[v] for _, v in pairs])
    return Parsed(classes, split("train"), split("test"), split("val"))


def parse_caltech101(root):
    def split(name):
        pairs = [ln.rsplit(" ", 1) for ln in _lines(os.path.join(root, f"{name}.txt"))]
        return _files(os.path.join(root, "101_ObjectCategories"), [p for p, _ in pairs], [int(y) for _, y in pairs])
    train, test = split("train"), split("test")
    names = {}
    for p, y in zip(train.paths + test.paths, train.targets + test.targets):
        names[y] = os.path.basename(os.path.dirname(p))
    return Parsed([names[i] for i in sorted(names)], train, test)


def parse_cars(root):
    base = os.path.join(root, "stanford_cars")
    classes = [str(c) for c in _loadmat(os.path.join(base, "devkit", "cars_meta.mat"))["class_names"]]
    def split(mat, folder):
        annos = np.atleast_1d(_loadmat(mat)["annotations"])
        return _files(os.path.join(base, folder), [str(a["fname"]) for a in annos],
                      [int(a["class"]) - 1 for a in annos])  # 1-based on disk
    return Parsed(classes, split(os.path.join(base, "devkit", "cars_train_annos.mat"), "cars_train"),
                  split(os.path.join(base, "cars_test_annos_withlabels.mat"), "cars_test"))


class UnsafePickleError(DataError):
    """A CIFAR file that names a global outside `_CifarUnpickler`'s list (it could run code): refused."""


def _numpy_globals() -> dict:
    """What numpy arrays in a pickle refer to, under both module names (numpy 1.x `core`, 2.x `_core`)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric
    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        found[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocol <= 4
        found[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return found


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals that CIFAR's python pickles (numpy arrays in dicts and lists) need.

    Plain `pickle.load` calls whatever a file names, so a planted `cifar-10-batches-py/data_batch_1`
    could run a shell command; the official files (Python 2 protocol 2) need only numpy's array
    reconstruction. `_codecs.encode` and `bytes` are how Python 3 writes bytes at protocol 2.
    """

    ALLOWED = {**_numpy_globals(), ("_codecs", "encode"): codecs.encode, ("builtins", "bytes"): bytes}

    def __init__(self, f, path: str):
        super().__init__(f, encoding="latin1")  # Python 2 str -> str; numpy re-encodes array bytes
        self.path = path

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load {self.path}: it names the global {module}.{name}, which a CIFAR file "
                f"never needs (only numpy arrays, lists and dicts) and which could run code; replace the "
                f"file with the official one from https://www.cs.toronto.edu/~kriz/cifar.html") from None


def _unpickle(path) -> dict:
    with open(_need(path, "file"), "rb") as f:
        data = _CifarUnpickler(f, path).load()
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{path} holds a {type(data).__name__}, not a CIFAR dict")
    # bytes keys: a file re-pickled by Python 3 from one loaded with encoding="bytes"
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in data.items()}


def _cifar(root, folder, train_files, test_files, label_key, meta_file, names_key):
    base = os.path.join(root, folder)
    def split(files):
        batches = [_unpickle(os.path.join(base, f)) for f in files]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return ArraySamples(np.ascontiguousarray(images), sum((list(b[label_key]) for b in batches), []))
    classes = list(_unpickle(os.path.join(base, meta_file))[names_key])
    return Parsed(classes, split(train_files), split(test_files))


def parse_cifar10(root):
    return _cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                  "labels", "batches.meta", "label_names")


def parse_cifar100(root):
    return _cifar(root, "cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names")


def parse_dtd(root, partition=1):
    base = os.path.join(root, "dtd", "dtd")
    lists = {s: _lines(os.path.join(base, "labels", f"{s}{partition}.txt")) for s in ("train", "val", "test")}
    classes = sorted({ln.split("/")[0] for lines in lists.values() for ln in lines})
    index = {c: i for i, c in enumerate(classes)}
    def split(s):
        return _files(os.path.join(base, "images"), lists[s], [index[ln.split("/")[0]] for ln in lists[s]])
    return Parsed(classes, split("train"), split("test"), split("val"))


def parse_flowers(root):
    base = os.path.join(root, "flowers-102")
    labels = np.atleast_1d(_loadmat(os.path.join(base, "imagelabels.mat"))["labels"]) - 1  # 1-based on disk
    ids = _loadmat(os.path.join(base, "setid.mat"))
    def split(key):
        image_ids = np.atleast_1d(ids[key]).tolist()
        return _files(os.path.join(base, "jpg"), [f"image_{i:05d}.jpg" for i in image_ids],
                      [int(labels[i - 1]) for i in image_ids])
    return Parsed([str(i) for i in range(int(labels.max()) + 1)], split("trnid"), split("tstid"), split("valid"))


def parse_food(root):
    base = os.path.join(root, "food-101")
    def read(name):
        with open(_need(os.path.join(base, "meta", f"{name}.json"), "file")) as f:
            return json.load(f)
    train, test = read("train"), read("test")
    classes = sorted(train)
    def split(meta):
        names = [f"{p}.jpg" for c in classes for p in meta.get(c, [])]
        return _files(os.path.join(base, "images"), names, [i for i, c in enumerate(classes) for _ in meta.get(c, [])])
    return Parsed(classes, split(train), split(test))


def parse_pets(root):
    base = os.path.join(root, "oxford-iiit-pet")
    def split(name):
        rows = [ln.split() for ln in _lines(os.path.join(base, "annotations", f"{name}.txt"))]
        return _files(os.path.join(base, "images"), [f"{r[0]}.jpg" for r in rows], [int(r[1]) - 1 for r in rows])
    train, test = split("trainval"), split("test")
    names = {y: os.path.basename(p).rsplit("_", 1)[0] for p, y in zip(train.paths, train.targets)}
    return Parsed([names.get(i, str(i)) for i in range(max(names) + 1)], train, test)


def parse_sun397(root):
    # ClassName.txt lines are '/a/abbey'; the class of '/a/abbey/sun_x.jpg' is its directory. The original
    # took the first class whose '/name/' is a substring of the path; for SUN397's names that is the same.
    classes = sorted(ln[3:] for ln in _lines(os.path.join(root, "ClassName.txt")))
    index = {c: i for i, c in enumerate(classes)}
    def split(name):
        rel = [ln.lstrip("/") for ln in _lines(os.path.join(root, name))]
        return _files(root, rel, [index[os.path.dirname(r)[2:]] for r in rel])
    return Parsed(classes, split("Training_01.txt"), split("Testing_01.txt"))


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def parse_voc2007(root):
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    def split(name):
        ids, columns = None, []
        for c in VOC_CLASSES:
            rows = [ln.split() for ln in _lines(os.path.join(base, "ImageSets", "Main", f"{c}_{name}.txt"))]
            ids = ids or [r[0] for r in rows]
            label = {r[0]: int(r[1]) == 1 for r in rows}  # -1 and 0 ("difficult") count as negative
            columns.append([float(label[i]) for i in ids])
        targets = torch.tensor(columns).T  # (N, 20)
        return _files(os.path.join(base, "JPEGImages"), [f"{i}.jpg" for i in ids], list(targets))
    return Parsed(list(VOC_CLASSES), split("train"), split("test"), split("val"))


def parse_cub(root):
    base = os.path.join(root, "CUB_200_2011")
    def table(name):
        return dict(ln.split(" ", 1) for ln in _lines(os.path.join(base, name)))
    images, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    ids = sorted(images, key=int)
    def split(flag):
        chosen = [i for i in ids if is_train[i].strip() == flag]
        return _files(os.path.join(base, "images"), [images[i] for i in chosen], [int(labels[i]) - 1 for i in chosen])
    train, test = split("1"), split("0")
    names = {y: os.path.dirname(p).split(os.sep)[-1] for p, y in zip(train.paths, train.targets)}
    return Parsed([names.get(i, str(i)) for i in range(max(names) + 1)], train, test)


def parse_imagefolder(root):
    from torchvision.datasets import ImageFolder

    for split in ("train", "test"):
        try:
            check_image_folder(os.path.join(root, split), what=f"imagefolder {split}")
        except (FileNotFoundError, ValueError) as e:
            raise DatasetLayoutError(str(e)) from e
    train, test = ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "test"))
    extra = sorted(set(test.classes) - set(train.classes))
    if extra:
        raise DatasetLayoutError(f"test/ has classes that train/ lacks: {extra[:5]}")
    test_labels = [train.class_to_idx[test.classes[y]] for _, y in test.samples]
    return Parsed(train.classes, FileSamples([p for p, _ in train.samples], [y for _, y in train.samples]),
                  FileSamples([p for p, _ in test.samples], test_labels))


def _entry(name, num_classes, metric, parse, layout, obtain):
    return name, DatasetSpec(name, num_classes, metric, parse, layout, obtain)


_TV = "torchvision.datasets.{}(ROOT, download=True) on a machine with internet, then copy ROOT here"
DATASETS = dict([
    _entry("aircraft", 100, "mean_per_class_accuracy", parse_aircraft,
           "    ROOT/fgvc-aircraft-2013b/data/{variants.txt, images_variant_{train,val,test}.txt, images/<id>.jpg}",
           "fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ extracted in ROOT, "
           "or " + _TV.format("FGVCAircraft")),
    _entry("caltech101", 102, "mean_per_class_accuracy", parse_caltech101,
           "    ROOT/{train.txt, test.txt}  (lines '<class_dir>/<file> <label>')\n"
           "    ROOT/101_ObjectCategories/<class_dir>/<file>.jpg  (102 folders, BACKGROUND_Google included)",
           "Caltech 101 from https://data.caltech.edu/records/mzrjq-6wc02 extracted in ROOT, then "
           "`python -m fine_grained.datasets make-caltech101-splits ROOT` (30 train images per class, seed 0)"),
    _entry("cars", 196, "accuracy", parse_cars,
           "    ROOT/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test/,\n"
           "                        cars_test_annos_withlabels.mat}  (torchvision's StanfordCars layout)",
           "the Stanford Cars mirror on Kaggle (the official URL is dead), arranged in torchvision's layout"),
    _entry("cifar10", 10, "accuracy", parse_cifar10,
           "    ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
           "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, or " + _TV.format("CIFAR10")),
    _entry("cifar100", 100, "accuracy", parse_cifar100,
           "    ROOT/cifar-100-python/{train, test, meta}",
           "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, or " + _TV.format("CIFAR100")),
    _entry("dtd", 47, "accuracy", parse_dtd,
           "    ROOT/dtd/dtd/{images/<class>/<file>.jpg, labels/{train,val,test}1.txt}",
           "dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ extracted in ROOT/dtd, "
           "or " + _TV.format("DTD")),
    _entry("flowers", 102, "mean_per_class_accuracy", parse_flowers,
           "    ROOT/flowers-102/{jpg/image_00001.jpg..., imagelabels.mat, setid.mat}",
           "102flowers.tgz, imagelabels.mat, setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, "
           "or " + _TV.format("Flowers102")),
    _entry("food", 101, "accuracy", parse_food,
           "    ROOT/food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}",
           "food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/, or "
           + _TV.format("Food101")),
    _entry("pets", 37, "mean_per_class_accuracy", parse_pets,
           "    ROOT/oxford-iiit-pet/{images/<id>.jpg, annotations/trainval.txt, annotations/test.txt}",
           "images.tar.gz + annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/, or "
           + _TV.format("OxfordIIITPet")),
    _entry("sun397", 397, "accuracy", parse_sun397,
           "    ROOT/{ClassName.txt, Training_01.txt, Testing_01.txt, a/abbey/sun_*.jpg, ...}  (ROOT = .../SUN397)",
           "SUN397.tar.gz and Partitions.zip from https://vision.princeton.edu/projects/2010/SUN/; put the "
           "partition .txt files next to ClassName.txt"),
    _entry("voc2007", 20, "voc_map_11pt", parse_voc2007,
           "    ROOT/VOCdevkit/VOC2007/{JPEGImages/<id>.jpg, ImageSets/Main/<class>_{train,val,test}.txt}",
           "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from "
           "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/, both extracted in ROOT"),
    _entry("cub", 200, "accuracy", parse_cub,
           "    ROOT/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/<class>/<file>}",
           "CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 extracted in ROOT"),
    _entry("imagefolder", 0, "accuracy", parse_imagefolder,
           "    ROOT/train/<class>/<image>   ROOT/test/<class>/<image>   (val = 20 % of train, seed 0)",
           "any classification data arranged in class folders"),
])
PAPER_DATASETS = ("aircraft", "caltech101", "cars", "cifar10", "cifar100", "dtd", "flowers", "food", "pets",
                  "sun397", "voc2007", "cub")


def make_caltech101_splits(root: str, per_class: int = 30, seed: int = 0) -> None:
    """Write ROOT/{train,test}.txt: `per_class` training images per class, the rest test.

    Differs from the original helper on purpose: it drew with replacement (duplicates, Q12); we draw
    without, so every class really has `per_class` distinct training images (or all but one if fewer).
    """
    base = os.path.join(root, "101_ObjectCategories")
    check_image_folder(base, what="caltech101 101_ObjectCategories")
    rng = np.random.RandomState(seed)
    train, test = [], []
    for label, cls in enumerate(sorted(e.name for e in os.scandir(base) if e.is_dir())):
        files = sorted(f for f in os.listdir(os.path.join(base, cls)) if f.lower().endswith(IMG_EXTENSIONS))
        chosen = set(rng.choice(len(files), min(per_class, max(len(files) - 1, 1)), replace=False).tolist())
        for i, f in enumerate(files):
            (train if i in chosen else test).append(f"{cls}/{f} {label}")
    for name, lines in (("train", train), ("test", test)):
        with open(os.path.join(root, f"{name}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print(f"wrote {len(train)} train / {len(test)} test lines to {root}/{{train,test}}.txt")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "make-caltech101-splits":
        sys.exit("usage: python -m fine_grained.datasets make-caltech101-splits ROOT")
    make_caltech101_splits(sys.argv[2])
