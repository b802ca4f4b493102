"""The training data of pretrain.main: the DataLoader over image folders, list files, --single-image or tar
shards, its workers' set-up, and the fixed batch of the PCA figure.
"""
import functools
import logging
import signal
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate

from common import data as cdata
from common.dist import DistInfo
from common.errors import DataError
from . import pipeline, shards
from .engine import PREEMPT_SIGNALS

log = logging.getLogger("pretrain")

PCA_IMAGES = 4  # images in the fixed PCA batch


class Data(NamedTuple):
    loader: torch.utils.data.DataLoader
    generator: torch.Generator  # seeds the workers (per epoch, see Trainer.train_one_epoch)
    steps_per_epoch: int
    pca_batch: torch.Tensor | None  # (PCA_IMAGES, 3, H, W) centre crops, or None


def build_data(cfg, info: DistInfo) -> Data:
    cdata.set_max_image_pixels(cfg["max_image_pixels"])
    transform = pipeline.train_transform(cfg, info.device)
    if shards.is_shard_spec(cfg["data_path"][0]) and not cfg["single_image"]:  # --single-image replaces the data
        return build_shard_data(cfg, info, transform)
    dataset = cdata.build_pretrain_dataset(cfg["data_path"], transform, cfg["on_bad_image"], cfg["class_fraction"],
                                           cfg["images_per_class"], cfg["single_image"],
                                           cfg["single_image_length"], cfg["seed"])
    sampler = PositionedSampler(cdata.build_train_sampler(dataset, info.world_size, info.rank, cfg["repeated_aug"],
                                                          cfg["seed"]))
    step_batch = step_batch_of(cfg)
    steps_per_epoch = len(sampler) // step_batch
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} images give {len(sampler)} per process, less than one batch of "
                        f"{step_batch}{batch_origin(cfg)}")
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(  # one optimizer step's images per batch (split into micro-batches)
        SeededSamples(dataset, cfg["seed"], info.rank), batch_size=step_batch, sampler=sampler,
        num_workers=cfg["num_workers"],
        pin_memory=cfg["pin_mem"] and info.device.type == "cuda", drop_last=True,
        collate_fn=collate_fn(transform), worker_init_fn=worker_init, generator=generator,
        persistent_workers=False, **pipeline.loader_kwargs(cfg["num_workers"]))
    pipeline.attach(loader, transform)
    log.info("data: %d images, %d steps/epoch of %d x %d processes", len(dataset), steps_per_epoch,
             step_batch, info.world_size)
    return Data(loader, generator, steps_per_epoch, fixed_pca_batch(dataset, cfg))


class PositionedSampler(torch.utils.data.Sampler):
    """A ResumableSampler's indices as (index, epoch, position in this rank's epoch) keys for SeededSamples."""

    def __init__(self, sampler: cdata.ResumableSampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip=skip)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return ((index, self.epoch, self.skip + k) for k, index in enumerate(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(torch.utils.data.Dataset):
    """`dataset` read at PositionedSampler's keys: every sample's augmentation is seeded by (seed, epoch, rank,
    position), as a shard sample's is, so a view depends neither on the worker that makes it nor on what that
    worker made before; a resumed epoch's workers therefore draw what the uninterrupted run's did (kill -9 and
    resume is bitwise with DataLoader workers too)."""

    def __init__(self, dataset, seed: int, rank: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        index, epoch, position = key
        shards.seed_sample(self.seed, epoch, self.rank, 0, position)
        return self.dataset[index]


def build_shard_data(cfg, info: DistInfo, transform) -> Data:
    """Tar shards streamed in whole batches (pretrain/shards.py): DeiT's repeated augmentation does not apply."""
    stream = shards.ShardStream(cfg["data_path"][0], transform, step_batch_of(cfg), world_size=info.world_size,
                                rank=info.rank, seed=cfg["seed"], on_bad_image=cfg["on_bad_image"])
    if stream.steps_per_epoch <= 0:
        raise DataError(f"{stream.num_samples} samples in {len(stream.urls)} shards give less than one batch of "
                        f"{step_batch_of(cfg)} per process{batch_origin(cfg)}")
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg["num_workers"], pin_memory=cfg["pin_mem"] and
        info.device.type == "cuda", collate_fn=shards.collate_shard_batch, worker_init_fn=worker_init,
        generator=generator, persistent_workers=False, **pipeline.loader_kwargs(cfg["num_workers"]))
    pipeline.attach(loader, transform)
    log.info("data: %d samples in %d shards, %d steps/epoch of %d x %d processes", stream.num_samples,
             len(stream.urls), stream.steps_per_epoch, step_batch_of(cfg), info.world_size)
    return Data(loader, generator, stream.steps_per_epoch, shard_pca_batch(stream, cfg))


def collate_fn(transform):
    """collate_skip_bad with the transform's own collate for its images where it has one (GPU path: bytes)."""
    return functools.partial(cdata.collate_skip_bad, collate_images=getattr(transform, "collate", default_collate))


def step_batch_of(cfg) -> int:
    """Images per process per optimizer step: the loader's batch (split into --batch-size micro-batches)."""
    return cfg["batch_size"] * cfg.get("accum_steps", 1)


def batch_origin(cfg) -> str:
    """Where the per-process step batch comes from, and the fix for too little data."""
    if cfg["global_batch_size"]:
        return (f" (--global-batch-size {cfg['global_batch_size']} / {cfg['world_size']} processes): lower "
                f"--global-batch-size or use more data")
    return " (--batch-size): lower --batch-size or use more data"


def worker_init(worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals: SLURM, `timeout`, container runtimes and Ctrl-C signal
    the whole process group, and a worker that dies of it takes the main process down before it can save."""
    for s in PREEMPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS)  # started blocked (Trainer.batches): now ignored
    cdata.seed_worker(worker_id)


def fixed_pca_batch(dataset, cfg) -> torch.Tensor | None:
    """PCA_IMAGES evenly spaced training images, centre-cropped (deterministic, no training RNG)."""
    if not cfg["pca_every_epochs"]:
        return None
    tf = cdata.build_eval_transform(resize=cfg["input_size"] * 256 // 224, crop=cfg["input_size"])
    if cfg["single_image"]:
        paths = [cfg["single_image"]]
    else:
        parts = dataset.datasets if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]
        samples = [s for part in parts for s in part.samples]
        paths = [samples[i][0] for i in np.linspace(0, len(samples) - 1, PCA_IMAGES).astype(int)]
    images = []
    for path in dict.fromkeys(paths):
        try:
            images.append(tf(cdata.load_rgb(path)))
        except cdata.BAD_IMAGE_ERRORS:
            continue  # unreadable images are reported by the training loader
    return torch.stack(images) if images else None


def shard_pca_batch(stream, cfg) -> torch.Tensor | None:
    """The first PCA_IMAGES readable images of the first shard, centre-cropped (no training RNG)."""
    if not cfg["pca_every_epochs"]:
        return None
    from webdataset.tariterators import tarfile_samples

    tf = cdata.build_eval_transform(resize=cfg["input_size"] * 256 // 224, crop=cfg["input_size"])
    images = []
    for sample in tarfile_samples([{"url": stream.urls[0]}], handler=lambda e: True):
        key = next((k for k in shards.IMAGE_KEYS if k in sample), None)
        try:
            images.append(tf(shards.decode_image(sample[key], stream.max_pixels)))
        except (TypeError, KeyError, *cdata.BAD_IMAGE_ERRORS):
            continue
        if len(images) == PCA_IMAGES:
            break
    return torch.stack(images) if images else None
