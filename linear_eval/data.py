"""ImageNet-style data for the linear probe: transforms, the held-out part of train, a resumable sampler.

Layout (torchvision ImageFolder; the DINOv2 `extra` files are not needed):
    TRAIN_ROOT/<wnid>/<image>.JPEG     (ImageNet: .../train, 1000 folders)
    VAL_ROOT/<wnid>/<image>.JPEG       (ImageNet: .../val sorted into the same wnid folders)
"""
import numpy as np
import torch
from torchvision import transforms

from common.data import IMAGENET_MEAN, IMAGENET_STD, SafeImageFolder, build_eval_transform
from common.errors import DataError, MissingFileError, UserError


def open_folder(root: str, flag: str) -> SafeImageFolder:
    """Scan an ImageFolder root; a missing root is a MissingFileError, an empty or flat one a DataError."""
    try:
        return SafeImageFolder(root)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise MissingFileError(f"{flag} {root}: {e}") from e
    except ValueError as e:  # common.data's "no class sub-folders" / "no image files"
        raise DataError(f"{flag} {root}: {e}") from e


def train_transform(size: int = 224):
    """DINOv2 linear-probe training view: RandomResizedCrop (bicubic, scale 0.08-1) + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int = 224):
    """Resize to size * 256/224 (256 at 224), centre-crop `size`."""
    return build_eval_transform(resize=round(size * 256 / 224), crop=size)


class View(torch.utils.data.Dataset):
    """A transformed view of some indices of a SafeImageFolder built without transform.

    Lets the train (augmented) and held-out (eval transform) parts share one directory scan.
    Unreadable images stay None so `collate_skip_bad` drops them. `target_map` remaps labels
    (robustness sets whose folders map onto a subset of the training classes).
    """

    def __init__(self, folder, indices, transform, target_map: dict | None = None):
        self.folder, self.indices, self.transform, self.target_map = folder, np.asarray(indices), transform, target_map

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        item = self.folder[int(self.indices[i])]
        if item is None:
            return None
        img, target = item
        return self.transform(img), (self.target_map[target] if self.target_map else target)


def holdout_indices(n: int, fraction: float, seed: int = 0):
    """Deterministic split of range(n) into (train, held-out) for selecting the head without val."""
    perm = np.random.RandomState(seed).permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[k:]), np.sort(perm[:k])


class ResumableSampler(torch.utils.data.Sampler):
    """Infinite sharded random sampler that can restart mid-stream (DINOv2's SHARDED_INFINITE + resume).

    Pass p is a permutation seeded by (seed, p); rank r takes every world-th index of it (each rank
    n // world indices per pass). `start` skips that many of this rank's samples, so a resumed run
    sees exactly the data order it would have seen without the interruption.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        if n < world:
            raise ValueError(f"{n} training samples cannot be sharded over {world} ranks")
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world, seed, start
        self.per_rank = n // world

    def __iter__(self):
        p, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
            shard = torch.randperm(self.n, generator=g)[self.rank::self.world][:self.per_rank]
            yield from shard[offset:].tolist()
            p, offset = p + 1, 0

    def __len__(self):  # infinite; DataLoader only needs this for len(loader), which we never call
        return 2**62
