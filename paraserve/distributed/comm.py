"""Collectives over a named group; no-ops when the group has one rank."""
from __future__ import annotations

import torch

from paraserve.distributed.parallel_state import GroupInfo


def all_reduce(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    if group.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=group.group)
    return x


def all_gather_last_dim(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    if group.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return torch.cat(parts, dim=-1)
