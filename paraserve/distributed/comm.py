"""Collectives over a named group; no-ops when the group has one rank.

Ring send/recv for context parallelism lives in ring.py.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from paraserve.distributed.parallel_state import GroupInfo, get_comm_stats


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_reduce(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """Sum over the group, in place; returns x."""
    if group.size == 1:
        return x
    import torch.distributed as dist

    get_comm_stats().add("all_reduce", 2 * (group.size - 1) / group.size * _nbytes(x))
    dist.all_reduce(x, group=group.group)
    return x


def all_gather(x: torch.Tensor, group: GroupInfo, dim: int = -1,
               sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's x along `dim`, in group-rank order. `sizes` gives each rank's
    extent along `dim` when they differ (gloo gathers equal shapes, so parts are padded)."""
    if group.size == 1:
        return x
    import torch.distributed as dist

    dim = dim % x.dim()
    get_comm_stats().add("all_gather", (group.size - 1) * _nbytes(x))
    if sizes is None:
        parts = [torch.empty_like(x) for _ in range(group.size)]
        dist.all_gather(parts, x.contiguous(), group=group.group)
        return torch.cat(parts, dim=dim)
    width = max(sizes)
    pad = list(x.shape)
    pad[dim] = width - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim) if pad[dim] else x.contiguous()
    parts = [torch.empty_like(padded) for _ in range(group.size)]
    dist.all_gather(parts, padded, group=group.group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def all_gather_last_dim(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    return all_gather(x, group, dim=-1)


def all_to_all(x: torch.Tensor, group: GroupInfo, output_splits: Sequence[int],
               input_splits: Sequence[int]) -> torch.Tensor:
    """Rows [sum(input_splits), ...] -> rows [sum(output_splits), ...]: rank r's i-th input block
    (input_splits[i] rows) becomes rank i's r-th output block. Zero-row blocks are fine."""
    if group.size == 1:
        return x
    import torch.distributed as dist

    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    row = _nbytes(x) // max(x.shape[0], 1)
    get_comm_stats().add("all_to_all", (sum(input_splits) - input_splits[group.rank]) * row)
    dist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits),
                           group=group.group)
    return out


def exchange_counts(send_counts: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """[size * k] counts, block i meant for rank i -> [size * k]: block i is what rank i sent us.
    The step before an all_to_all whose split sizes only the senders know."""
    if group.size == 1:
        return send_counts
    import torch.distributed as dist

    out = torch.empty_like(send_counts)
    get_comm_stats().add("all_to_all (counts)", (group.size - 1) / group.size * _nbytes(send_counts))
    dist.all_to_all_single(out, send_counts.contiguous(), group=group.group)
    return out


def broadcast(x: torch.Tensor, group: GroupInfo, src: int = 0) -> torch.Tensor:
    """Every rank gets group rank `src`'s x (same shape and dtype everywhere), in place."""
    if group.size == 1:
        return x
    import torch.distributed as dist

    if group.rank == src:
        get_comm_stats().add("broadcast", (group.size - 1) * _nbytes(x))
    dist.broadcast(x, src=group.ranks[src], group=group.group)
    return x


def broadcast_object(obj: Any, group: GroupInfo, src: int = 0) -> Any:
    """Group rank `src`'s picklable obj on every rank (others pass anything, e.g. None)."""
    if group.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    if group.rank == src:
        import pickle

        get_comm_stats().add("broadcast (objects)", (group.size - 1) * len(pickle.dumps(obj)))
    dist.broadcast_object_list(box, src=group.ranks[src], group=group.group)
    return box[0]
