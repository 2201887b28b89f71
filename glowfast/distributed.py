"""torch.distributed helpers for training: set-up from torchrun's environment, rank queries, syncing."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from ._checks import check_device_exists

__all__ = ["DistInfo", "ResumableDistributedSampler", "broadcast_module", "broadcast_object", "cleanup",
           "init_from_env", "is_dist", "params_in_sync"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(device_str: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and pick the device.

    With WORLD_SIZE > 1 this initialises the default process group: NCCL when the device is CUDA, gloo
    otherwise. ``device_str``: "auto" (cuda when available), "cpu", "cuda" or "cuda:N"; under torchrun
    "cuda"/"auto" mean ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device_str == "auto":
        device_str = "cuda" if torch.cuda.is_available() else "cpu"
    if device_str.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine")  # the caller names the option
    if device_str == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device(device_str)
    check_device_exists(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local_rank)
    if world > 1 and not is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30), **kwargs)
    return info, device


def cleanup() -> None:
    if is_dist():
        if dist.get_backend() == "gloo":
            # Every rank done before any tears down: a gloo rank destroying its group while a peer's last
            # operations are still in flight aborted now and then ("terminate called without an active
            # exception", SIGABRT at exit; seen twice in ~30 CPU runs). Bounded: a rank that died does not
            # keep the others here longer than 30 s.
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            except Exception:
                pass
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks."""
    if not is_dist():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if t.dtype == torch.bool:
            tmp = t.to(torch.uint8)
            dist.broadcast(tmp, src)
            t.copy_(tmp.bool())
        else:
            dist.broadcast(t.data, src)


@torch.no_grad()
def params_in_sync(module: nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (compared through an all_gather)."""
    if not is_dist():
        return True
    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (for exact resumption).

    The order of an epoch is DistributedSampler's: a permutation seeded by ``seed + epoch``, split across
    ranks. ``set_position(epoch, batches_done, batch_size)`` skips the batches already consumed. Works
    without torch.distributed too (``num_replicas=1, rank=0``).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, batches_done: int, batch_size: int) -> None:
        self.set_epoch(epoch)
        self.start = batches_done * batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
