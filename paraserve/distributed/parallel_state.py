"""Process groups (tp, ...) behind accessors. Layers ask here, never for the world group.

Only single-process groups exist so far: every group has size 1 and rank 0, so the
collectives in comm.py are no-ops and model code reads as single-device code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GroupInfo:
    name: str
    size: int = 1
    rank: int = 0
    group: Optional[object] = None  # torch.distributed ProcessGroup when size > 1


class _State:
    def __init__(self) -> None:
        self.groups: dict[str, GroupInfo] = {}


_state = _State()


def init_single_process() -> None:
    """Size-1 groups for a one-process engine; idempotent."""
    for name in ("tp", "ep", "cp", "dp"):
        _state.groups.setdefault(name, GroupInfo(name))


def _get(name: str) -> GroupInfo:
    if name not in _state.groups:
        raise RuntimeError(f"parallel state not initialised: no {name} group "
                           "(call init_single_process() or the executor's init first)")
    return _state.groups[name]


def get_tp_group() -> GroupInfo:
    return _get("tp")


def get_ep_group() -> GroupInfo:
    return _get("ep")


def tp_size() -> int:
    return get_tp_group().size


def tp_rank() -> int:
    return get_tp_group().rank
