"""Held-out evaluation: mean bits/dim of a Glow model over a whole dataset split."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["evaluate_bpd", "iterate_batches", "shard_indices", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The Glow inside a DistributedDataParallel / compiled wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Indices rank, rank + W, ... of ``range(n)``: every item exactly once over all ranks (no padding)."""
    return list(range(rank, n, world_size))


def iterate_batches(dataset: Dataset, batch_size: int, indices: list[int] | None = None,
                    num_workers: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, int64 labels) batches in index order; a fast path for in-memory tensor datasets."""
    if indices is None:
        indices = list(range(len(dataset)))
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        idx = torch.as_tensor(indices, dtype=torch.long)
        for i in range(0, len(idx), batch_size):
            j = idx[i: i + batch_size]
            yield images[j], labels[j]
        return
    subset = torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())
    for x, y in loader:
        yield x, torch.as_tensor(y)


@torch.no_grad()
def evaluate_bpd(model: nn.Module, data: Dataset | DataLoader | Iterable, device: torch.device | str | None = None,
                 batch_size: int = 256, y_condition: bool = False, seed: int | None = 0,
                 num_workers: int = 0) -> float:
    """Mean bits/dim of ``model`` over every image of ``data`` (no grad, eval mode, training mode restored).

    ``data`` is a Dataset of ``(uint8 image, label)`` (under torch.distributed each rank evaluates a disjoint
    shard and the sums are all-reduced, so every rank returns the mean over the whole split), or any iterable
    of ``(images, labels)`` batches / image tensors (evaluated as given, no sharding).
    ``y_condition`` passes the labels to a class-conditional model. ``seed`` fixes the dequantisation noise
    (a private generator: the global RNG is not consumed); ``None`` uses the global RNG.
    """
    glow = unwrap(model)
    if device is None:
        device = next(glow.parameters()).device
    device = torch.device(device)
    was_training = glow.training
    glow.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    rank, world = _dist_info()
    if isinstance(data, Dataset):
        batches = iterate_batches(data, batch_size, shard_indices(len(data), rank, world), num_workers)
        reduce = world > 1
    else:
        batches = data
        reduce = False
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                x, y = batch[0], batch[1]
            else:
                x, y = batch, None
            x = x.to(device, non_blocking=True)
            yy = torch.as_tensor(y).to(device) if (y_condition and y is not None) else None
            bpd = glow(x, yy, generator=generator).bits_per_dim
            total += bpd.double().sum()
            count += bpd.numel()
    finally:
        glow.train(was_training)
    if reduce:
        stats = torch.stack([total, count])
        dist.all_reduce(stats)
        total, count = stats[0], stats[1]
    if count.item() == 0:
        return math.nan
    return float(total / count)
