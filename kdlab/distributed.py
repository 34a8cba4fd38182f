"""Keeping per-sample state identical across DDP processes.

Losses with per-sample state (CRD's memory banks, PS-KD's prediction bank) write rows keyed by
`batch["index"]`. Under DDP each process gets only its sampler's share of the data, so a bank
written with the local batch alone would see 1/world of the samples each epoch and drift apart
from the other processes' banks. `gather_rows` collects every process's rows before the write,
so every process writes the union of the step's batches, as one process with the whole batch
would, and the banks stay identical. `mean_across_processes` averages a statistic (CRD's
normaliser) the same way.

Both are the identity outside DDP: no process group, or a group of one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from kdlab.errors import KdlabError


def world_size() -> int:
    """The number of processes in the default process group; 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def gather_rows(index: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """`(index, *values)` of every process, with one row per distinct index.

    Row i of each tensor in `values` belongs to `index[i]`. Every process must call this at
    the same point of the step (it is a collective), with values of the same trailing shapes
    and dtypes; the batch sizes may differ. The result is the same on every process: the
    processes' rows, detached, ordered by index. An index that occurs more than once
    (DistributedSampler pads the last ranks' share by repeating samples) keeps its first row in
    rank order, so that a write with the result is deterministic: an indexed write with
    repeated indices may keep any of them, and on a GPU not necessarily the same one on every
    process. Cost: one all-gather per tensor plus one of the batch sizes, which the host waits for.
    """
    for value in values:
        if value.shape[0] != index.shape[0]:
            raise KdlabError(
                f"gather_rows takes one row of each value per index, but got {index.shape[0]} indices "
                f"and a value of shape {tuple(value.shape)}. Pass the values of the same batch whose "
                "batch['index'] is given, with the batch along the first dimension."
            )
    world = world_size()
    if world == 1:
        return (index, *values)
    # The batch sizes first: the last batch of an epoch, or a custom sampler, can differ per process.
    size = torch.tensor([index.shape[0]], device=index.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    gathered = []
    for tensor in (index, *values):
        padded = tensor.detach().new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]))
    keep = first_occurrences(gathered[0])
    return tuple(tensor[keep] for tensor in gathered)


def first_occurrences(index: Tensor) -> Tensor:
    """The positions of the first occurrence of each distinct value of `index`, ascending by value."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.shape[0], device=index.device)
    first = torch.full(unique.shape, index.shape[0], dtype=positions.dtype, device=index.device)
    return first.scatter_reduce_(0, inverse, positions, reduce="amin")


@torch.no_grad()
def mean_across_processes(tensor: Tensor) -> Tensor:
    """The element-wise mean of `tensor` over all processes (a collective); `tensor` itself outside DDP."""
    world = world_size()
    if world == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / world
