"""Distributed set-up that runs unchanged single-process (CPU or one GPU) and under torchrun.

torchrun (single- or multi-node) exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
without them we run as a world of one and never touch torch.distributed.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks cuda:<local_rank> when a GPU is visible, else cpu. 'cuda' without a GPU is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank if requested == "cuda" else torch.device(requested).index)
    if requested != "cpu":
        raise ConfigError(f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_min: int = 30) -> DistInfo:
    """Initialise the process group from torchrun's environment (NCCL on GPU, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(0, 1, 0, resolve_device(device, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (returns a new tensor; identity in a world of one)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / get_world_size()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one in a world of one)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (identity in a world of one)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
