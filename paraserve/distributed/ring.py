"""A compact ring communicator over a torch.distributed process group.

Each rank sends to the next rank of an ordered ring and receives from the previous one.
Transfers are asynchronous (batch_isend_irecv: gloo on CPU, NCCL on GPU) so the caller can
compute on the block it holds while the next one is in flight. `two_level_rings` builds the
intra-node and inter-node rings of a CP group laid out as nodes x local ranks (BurstAttention);
on one host the "nodes" are simply consecutive blocks of ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from paraserve.distributed.parallel_state import get_comm_stats


@dataclass
class RingStats:
    """Accumulated by ring_attention over its calls; host timers only, so no device syncs.

    On CPU/gloo the timers are exact. On GPU/NCCL, wait() only orders streams, so the host
    timers understate blocking there; use a profiler for GPU overlap figures.
    """
    calls: int = 0
    bytes_sent: int = 0
    transfers: int = 0
    skipped_blocks: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0  # host time blocked in wait(): the exposed part of communication
    in_flight_s: float = 0.0  # issue -> wait() returned, summed over transfers

    @property
    def hidden_fraction(self) -> float:
        """Share of the transfers' in-flight time that overlapped other work (1.0 = all hidden).

        A transfer is in flight from issue until wait() returns; only the part spent blocked
        in wait() was exposed. in_flight_s is an upper bound on the true transfer time.
        """
        if self.in_flight_s <= 0.0:
            return 1.0
        return max(0.0, 1.0 - self.wait_s / self.in_flight_s)


@dataclass
class RingHandle:
    """Pending transfers of one start_send_recv; wait() returns the received tensors."""
    works: list
    received: list[torch.Tensor]
    sent: list[torch.Tensor]  # held until wait(): the sends read them asynchronously
    issued_at: float
    stats: Optional[RingStats] = None

    def wait(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        t1 = time.perf_counter()
        if self.stats is not None:
            self.stats.wait_s += t1 - t0
            self.stats.in_flight_s += t1 - self.issued_at
        self.works, self.sent = [], []
        return self.received


class RingComm:
    """Send to ranks[i+1], receive from ranks[i-1], where ranks[i] is this process's rank.

    ranks are global ranks (what torch.distributed p2p addresses), in ring order.
    tag_base separates concurrent rings between the same pair of processes on gloo (NCCL
    ignores tags and orders by issue).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], ranks: Sequence[int],
                 tag_base: int = 0) -> None:
        self.group = group
        self.ranks = list(ranks)
        me = dist.get_rank()
        if me not in self.ranks:
            raise ValueError(f"rank {me} is not in the ring {self.ranks}")
        i = self.ranks.index(me)
        self.size = len(self.ranks)
        self.index = i
        self.next_rank = self.ranks[(i + 1) % self.size]
        self.prev_rank = self.ranks[(i - 1) % self.size]
        self.tag_base = tag_base

    def start_send_recv(self, tensors: Sequence[torch.Tensor],
                        stats: Optional[RingStats] = None) -> RingHandle:
        """Issue async sends of `tensors` to the next rank and receives of same-shaped
        tensors from the previous one. The caller must not modify `tensors` until wait()."""
        if self.size == 1:
            return RingHandle([], list(tensors), [], time.perf_counter(), stats)
        sends = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sends]
        ops = []
        for j, (s, r) in enumerate(zip(sends, received)):
            tag = self.tag_base + j
            ops.append(dist.P2POp(dist.isend, s, self.next_rank, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, r, self.prev_rank, self.group, tag))
        issued_at = time.perf_counter()
        # batched so NCCL groups the pair: separate send/recv to the same peer can deadlock
        works = dist.batch_isend_irecv(ops)
        if stats is not None:
            stats.transfers += 1
            stats.bytes_sent += sum(s.numel() * s.element_size() for s in sends)
        return RingHandle(list(works), received, sends, issued_at, stats)


def group_ranks(group: Optional[dist.ProcessGroup]) -> list[int]:
    """Global ranks of `group`, in group-rank order."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def two_level_rings(group: Optional[dist.ProcessGroup], ranks: Sequence[int],
                    local_size: int) -> tuple[RingComm, RingComm]:
    """(intra, inter) rings for a group of len(ranks) = num_nodes * local_size ranks.

    Node n holds ranks[n*local_size : (n+1)*local_size]. The intra ring links the local ranks
    of this node; the inter ring links the ranks with this local index across nodes.
    """
    if local_size < 1 or len(ranks) % local_size:
        raise ValueError(f"local_size {local_size} does not divide the group size {len(ranks)}")
    i = list(ranks).index(dist.get_rank())
    node, local = divmod(i, local_size)
    num_nodes = len(ranks) // local_size
    intra = RingComm(group, ranks[node * local_size:(node + 1) * local_size], tag_base=0)
    inter = RingComm(group, [ranks[n * local_size + local] for n in range(num_nodes)],
                     tag_base=16)
    return intra, inter


def all_gather_stacked(x: torch.Tensor, group: Optional[dist.ProcessGroup],
                       size: int) -> torch.Tensor:
    """[*shape] on each rank -> [size, *shape], stacked in group-rank order."""
    get_comm_stats().add("all_gather", (size - 1) * x.numel() * x.element_size())
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)
