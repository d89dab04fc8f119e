"""Process groups (tp, cp, dp, ep, etp) behind accessors. Layers ask here, never for the world group.

A one-process engine calls `init_single_process()`: every group has size 1, so the collectives in
comm.py are no-ops and model code reads as single-device code. A multi-process engine initialises
torch.distributed (one process per rank) and calls `init_distributed(...)` on every rank, which
lays the world out as vLLM does (tp innermost, then cp, then dp) and builds the real subgroups.

MoE layers use two more groups. `ep`: the ranks among which the experts are partitioned.
`etp`: the ranks that hold the same experts and split each expert's intermediate dimension (all
of tp when experts are not partitioned, size 1 when `enable_expert_parallel` spreads them over
every rank). Etp peers always sit in one tp group, so they see the same tokens.

`mp` (model parallel): the tp x cp ranks of one dp index, which run one batch together; the model
runner's rank 0 in it samples and the others take its tokens (so their states cannot drift).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from paraserve.config import ConfigError

GROUP_NAMES = ("tp", "cp", "dp", "ep", "etp", "mp")


@dataclass(frozen=True)
class GroupInfo:
    name: str
    size: int = 1
    rank: int = 0  # this process's rank within the group
    group: Optional[object] = None  # torch.distributed ProcessGroup when size > 1
    ranks: tuple[int, ...] = (0,)  # global ranks of the members, in group-rank order


@dataclass(frozen=True)
class ParallelLayout:
    """How world ranks map onto parallel dimensions: rank = (dp_i * cp + cp_i) * tp + tp_i.

    ep = 1: experts are not partitioned; each is split over the tp group (etp = tp).
    ep > 1: experts are partitioned over ep ranks and split over etp = world / ep ranks, which
    must divide tp (etp peers are consecutive ranks, so they share a tp group and its tokens).
    """
    world_size: int
    tp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.cp):
            raise ConfigError(f"world size {self.world_size} is not a multiple of tensor parallel "
                              f"({self.tp}) x context parallel ({self.cp})")
        if self.ep > 1 and (self.world_size % self.ep or self.tp % (self.world_size // self.ep)):
            raise ConfigError(
                f"expert parallel size {self.ep} must divide the world size {self.world_size} and "
                f"be a multiple of dp x cp ({self.dp * self.cp}), e.g. "
                f"{self.world_size} (experts over every rank)")

    @classmethod
    def build(cls, world_size: int, tp_size: int = 1, cp_size: int = 1,
              ep_size: Optional[int] = None, enable_expert_parallel: bool = False) -> "ParallelLayout":
        """vLLM's flags: `enable_expert_parallel` spreads experts over all tp x cp x dp ranks;
        an explicit `ep_size` chooses a smaller expert-parallel group."""
        if enable_expert_parallel and ep_size not in (None, world_size):
            raise ConfigError(f"enable_expert_parallel spreads experts over all {world_size} ranks; "
                              f"it conflicts with expert parallel size {ep_size}")
        ep = world_size if enable_expert_parallel else (ep_size or 1)
        return cls(world_size, tp_size, cp_size, ep)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp)

    @property
    def etp(self) -> int:
        return self.tp if self.ep == 1 else self.world_size // self.ep

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp index, cp index, tp index) of a world rank."""
        return rank // (self.tp * self.cp), (rank // self.tp) % self.cp, rank % self.tp

    def group_ranks(self, name: str) -> list[tuple[int, ...]]:
        """Every group of dimension `name`, each as its global ranks in group-rank order."""
        n, tp, cp, dp = self.world_size, self.tp, self.cp, self.dp
        if name == "tp" or (name == "etp" and self.ep == 1):
            return [tuple(range(b, b + tp)) for b in range(0, n, tp)]
        if name == "cp":
            return [tuple(d * cp * tp + c * tp + t for c in range(cp)) for d in range(dp) for t in range(tp)]
        if name == "dp":
            return [tuple(d * cp * tp + c * tp + t for d in range(dp)) for c in range(cp) for t in range(tp)]
        if name == "ep":
            if self.ep == 1:
                return [(r,) for r in range(n)]
            return [tuple(e * self.etp + j for e in range(self.ep)) for j in range(self.etp)]
        if name == "etp":
            return [tuple(range(b, b + self.etp)) for b in range(0, n, self.etp)]
        if name == "mp":
            return [tuple(range(b, b + tp * cp)) for b in range(0, n, tp * cp)]
        raise ValueError(f"unknown group {name!r}; groups are {GROUP_NAMES}")


@dataclass
class CommStats:
    """What this rank's collectives sent since the last reset: per collective, calls and bytes
    on the wire from this rank, as the usual algorithms move them (ring all-reduce 2(n-1)/n of
    the tensor, all-gather (n-1) x its part, all-to-all the rows bound for other ranks, a
    broadcast's source (n-1) x the tensor). Collectives of size-1 groups send nothing."""
    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()


class _State:
    def __init__(self) -> None:
        self.groups: dict[str, GroupInfo] = {}
        self.layout: Optional[ParallelLayout] = None
        self.owned: list[object] = []  # subgroups we created and must destroy
        self.comm = CommStats()


_state = _State()


def init_single_process() -> None:
    """Size-1 groups for a one-process engine; idempotent, and a no-op when already initialised."""
    if _state.layout is None:
        _state.layout = ParallelLayout(1)
    for name in GROUP_NAMES:
        _state.groups.setdefault(name, GroupInfo(name))


def init_distributed(tp_size: int = 1, ep_size: Optional[int] = None, cp_size: int = 1, *,
                     enable_expert_parallel: bool = False) -> ParallelLayout:
    """Build the tp/cp/dp/ep/etp subgroups of the initialised world; call on every rank, in the
    same order. The default process group (and its backend) is the caller's."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("init_distributed needs torch.distributed initialised first "
                           "(dist.init_process_group on every rank)")
    if _state.groups:
        raise RuntimeError("parallel state is already initialised; call destroy_parallel_state() first")
    layout = ParallelLayout.build(dist.get_world_size(), tp_size, cp_size, ep_size, enable_expert_parallel)
    me = dist.get_rank()
    made: dict[tuple[int, ...], object] = {}
    for name in GROUP_NAMES:
        for ranks in layout.group_ranks(name):
            # every rank creates every group, in the same order, as new_group requires
            if len(ranks) > 1 and ranks not in made:
                made[ranks] = dist.new_group(list(ranks))
                _state.owned.append(made[ranks])
            if me in ranks:
                _state.groups[name] = GroupInfo(name, len(ranks), ranks.index(me), made.get(ranks), ranks)
    _state.layout = layout
    return layout


def destroy_parallel_state() -> None:
    """Forget every group and destroy the subgroups init_distributed made (not the world group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        for group in _state.owned:
            dist.destroy_process_group(group)
    _state.groups.clear()
    _state.owned.clear()
    _state.layout = None


def _get(name: str) -> GroupInfo:
    if name not in _state.groups:
        raise RuntimeError(f"parallel state not initialised: no {name} group "
                           "(call init_single_process() or init_distributed() first)")
    return _state.groups[name]


def get_layout() -> ParallelLayout:
    if _state.layout is None:
        raise RuntimeError("parallel state not initialised (call init_single_process() or "
                           "init_distributed() first)")
    return _state.layout


def get_tp_group() -> GroupInfo:
    return _get("tp")


def get_cp_group() -> GroupInfo:
    return _get("cp")


def get_dp_group() -> GroupInfo:
    return _get("dp")


def get_ep_group() -> GroupInfo:
    return _get("ep")


def get_etp_group() -> GroupInfo:
    return _get("etp")


def get_comm_stats() -> CommStats:
    return _state.comm


def get_mp_group() -> GroupInfo:
    return _get("mp")


def tp_size() -> int:
    return get_tp_group().size


def tp_rank() -> int:
    return get_tp_group().rank
