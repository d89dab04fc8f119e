"""Context-parallel attention: ring attention for prefill, an LSE all-gather merge for decode.

Every partial result is an (out, lse) pair in float32; partials over disjoint key sets merge
exactly by log-sum-exp, so the order in which K/V blocks arrive does not matter.

Padding: shards must all have the same length (the ring receives into buffers shaped like
what it sends), so the layout helpers pad the sequence up to a multiple of the chunk count.
A padded slot has position PAD_POSITION: as a key it is never attended; as a query (causal)
it sees nothing and yields zeros, and restore_sequence drops it.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch

from paraserve.distributed.parallel_state import GroupInfo
from paraserve.distributed.ring import (RingComm, RingStats, all_gather_stacked, group_ranks,
                                        two_level_rings)

PAD_POSITION = -1  # position of a padding slot in a shard; real positions are >= 0
OnBlock = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (k, v, k_pos) of a ring block
_NEG_INF = float("-inf")


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: q [Tq, H, D], k/v [Tk, KVH, D], mask [Tq, Tk] bool (True = may attend).

    Returns out [Tq, H, D] and lse [Tq, H], both float32; a fully masked row has out 0 and
    lse -inf. Query head h reads KV head h // (H // KVH), as repeat_interleave would.
    """
    tq, h, d = q.shape
    kvh = k.shape[1]
    if h % kvh:
        raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    qg = q.float().reshape(tq, kvh, h // kvh, d)  # [Tq, KVH, G, D]
    s = torch.einsum("qkgd,tkd->kgqt", qg, k.float()) * scale  # [KVH, G, Tq, Tk]
    if mask is not None:
        s = s.masked_fill(~mask, _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [KVH, G, Tq]
    p = torch.exp(s - _finite(lse).unsqueeze(-1))  # masked scores give exp(-inf) = 0
    out = torch.einsum("kgqt,tkd->qkgd", p, v.float()).reshape(tq, h, d)
    return out, lse.permute(2, 0, 1).reshape(tq, h)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials over disjoint keys: out [..., D], lse [...] (float32) -> (out, lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = _finite(lse)  # rows masked on both sides: both weights become exp(-inf) = 0, not NaN
    wa = torch.exp(lse_a - ref).unsqueeze(-1)
    wb = torch.exp(lse_b - ref).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(lse == _NEG_INF, 0.0)


# ---- layouts: which positions each CP rank holds ----

def shard_positions(num_tokens: int, cp_size: int, rank: int, zigzag: bool = True,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions [shard_len] held by `rank`, PAD_POSITION for padding slots.

    zigzag: the (padded) sequence is cut into 2*cp chunks of ceil(T / (2*cp)) tokens; rank i
    holds chunks i and 2*cp-1-i, so every rank gets an equal share of causal work. Padding
    (< 2*cp slots) sits at the end of the sequence, i.e. in the chunks of the lowest ranks.
    Contiguous: cp chunks of ceil(T / cp) tokens, rank i holds chunk i.
    """
    if zigzag:
        c = math.ceil(num_tokens / (2 * cp_size))
        mirror = 2 * cp_size - 1 - rank
        slots = torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                           torch.arange(mirror * c, (mirror + 1) * c, device=device)])
    else:
        c = math.ceil(num_tokens / cp_size)
        slots = torch.arange(rank * c, (rank + 1) * c, device=device)
    return slots.masked_fill(slots >= num_tokens, PAD_POSITION)


def shard_sequence(x: torch.Tensor, cp_size: int, rank: int, zigzag: bool = True) -> torch.Tensor:
    """x [T, ...] -> this rank's shard [shard_len, ...], zeros in the padding slots."""
    pos = shard_positions(x.shape[0], cp_size, rank, zigzag, x.device)
    out = x.new_zeros((pos.shape[0], *x.shape[1:]))
    real = pos != PAD_POSITION
    out[real] = x[pos[real]]
    return out


def restore_sequence(shards: Sequence[torch.Tensor], num_tokens: int,
                     zigzag: bool = True) -> torch.Tensor:
    """Inverse of shard_sequence: the shards of ranks 0..cp-1 -> [T, ...] in sequence order."""
    flat = torch.cat(list(shards))
    pos = torch.cat([shard_positions(num_tokens, len(shards), r, zigzag, flat.device)
                     for r in range(len(shards))])
    out = flat.new_empty((num_tokens, *flat.shape[1:]))
    real = pos != PAD_POSITION
    out[pos[real]] = flat[real]
    return out


# ---- prefill: the ring ----

class _Accumulator:
    """Running (out, lse) of the local queries over the K/V blocks seen so far."""

    def __init__(self, q: torch.Tensor, q_pos: torch.Tensor, scale: float, causal: bool,
                 stats: Optional[RingStats], on_block: Optional[OnBlock] = None) -> None:
        self.q, self.q_pos, self.scale, self.causal, self.stats = q, q_pos, scale, causal, stats
        self.on_block = on_block
        self.out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [Tq, H, D]
        self.lse = torch.full(q.shape[:2], _NEG_INF, dtype=torch.float32, device=q.device)

    def add(self, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor) -> None:
        if self.on_block is not None:
            self.on_block(k, v, k_pos)
        t0 = time.perf_counter()
        mask = (k_pos != PAD_POSITION).unsqueeze(0)  # [1, Tk]
        if self.causal:
            mask = mask & (k_pos.unsqueeze(0) <= self.q_pos.unsqueeze(1))  # [Tq, Tk]
        mask = mask.expand(self.q.shape[0], -1)
        rows = cols = slice(None)
        if mask.device.type == "cpu":
            # host reads cost nothing here (on GPU they would sync every step): skip blocks
            # entirely in the future, and drop the query rows / key columns that see nothing,
            # which halves the off-diagonal zigzag blocks
            rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
            if rows.numel() == 0:
                if self.stats is not None:
                    self.stats.skipped_blocks += 1
                return
            mask = mask[rows][:, cols]
        out, lse = attention_with_lse(self.q[rows], k[cols], v[cols], self.scale, mask)
        self.out[rows], self.lse[rows] = merge_lse(self.out[rows], self.lse[rows], out, lse)
        if self.stats is not None:
            self.stats.compute_s += time.perf_counter() - t0


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   k_pos: torch.Tensor, group: GroupInfo, scale: float, *, causal: bool = True,
                   local_size: Optional[int] = None, ranks: Optional[Sequence[int]] = None,
                   stats: Optional[RingStats] = None, on_block: Optional[OnBlock] = None) -> torch.Tensor:
    """Attention of this rank's queries over the K/V of every rank of the CP group.

    q [Tq, H, D], k/v [Tk, KVH, D], q_pos [Tq], k_pos [Tk] global positions (any layout:
    zigzag, contiguous, ...; PAD_POSITION for padding). Tk must be equal on all ranks.
    local_size: ranks per node for the two-level BurstAttention ring (None: one flat ring).
    ranks: global ranks of the group in group-rank order (default: asked from torch).
    stats: accumulates bytes sent and overlap timings. on_block(k, v, k_pos): called once with
    every K/V block this rank sees, its own included (the engine stores the positions it owns
    into its KV cache shard from there, with no extra transfer). Returns [Tq, H, D] in q's dtype.
    """
    acc = _Accumulator(q, q_pos, scale, causal, stats, on_block)
    if stats is not None:
        stats.calls += 1
    block = [k, v, k_pos]
    if group.size == 1:
        acc.add(*block)
    else:
        ranks = list(ranks) if ranks is not None else group_ranks(group.group)
        if local_size is None or local_size in (1, group.size):
            _flat_ring(RingComm(group.group, ranks), block, acc)
        else:
            _two_level_ring(*two_level_rings(group.group, ranks, local_size), block, acc)
    return acc.out.to(q.dtype)


def _flat_ring(comm: RingComm, block: list[torch.Tensor], acc: _Accumulator) -> None:
    for step in range(comm.size):
        # issue the next hop before computing, so the transfer runs under this block's compute
        handle = comm.start_send_recv(block, acc.stats) if step + 1 < comm.size else None
        acc.add(*block)
        if handle is not None:
            block = handle.wait()


def _two_level_ring(intra: RingComm, inter: RingComm, block: list[torch.Tensor],
                    acc: _Accumulator) -> None:
    """BurstAttention schedule, N nodes x L local ranks, rank (n, l):

    node-step j = 0..N-1: the rank holds a seed block S_j, from rank (n-j mod N, l).
      - At intra-step 0 it issues the inter-node hop of S_j to (n+1, l) (receiving S_{j+1}
        from (n-1, l)); it is waited only after intra-step L-1, so the slow hop is hidden
        behind L block computes and L-1 intra hops instead of one compute as in a flat ring.
      - intra-step i = 0..L-1: compute on the block from (n-j, l-i); before that compute,
        the intra hop of that block to (n, l+1) is already issued (except at i = L-1).
    After N*L computes every rank has seen every block once; S_j is only read by both hops.
    """
    seed = block
    for node_step in range(inter.size):
        hop = inter.start_send_recv(seed, acc.stats) if node_step + 1 < inter.size else None
        cur = seed
        for i in range(intra.size):
            handle = intra.start_send_recv(cur, acc.stats) if i + 1 < intra.size else None
            acc.add(*cur)
            if handle is not None:
                cur = handle.wait()
        if hop is not None:
            seed = hop.wait()


# ---- decode: the KV sequence is sharded, the query is not ----

def decode_attention_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: GroupInfo,
                        scale: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [Tq, H, D] (the same on every CP rank), k/v [Tk_local, KVH, D] this rank's KV shard,
    mask [Tq, Tk_local] bool or None. Returns [Tq, H, D] in q's dtype, the same on all ranks."""
    out, lse = attention_with_lse(q, k, v, scale, mask)
    if group.size > 1:
        # one collective: lse rides as an extra channel of out
        packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # [Tq, H, D+1]
        parts = all_gather_stacked(packed, group.group, group.size)  # [CP, Tq, H, D+1]
        out, lse = parts[0, ..., :-1], parts[0, ..., -1]
        for r in range(1, group.size):
            out, lse = merge_lse(out, lse, parts[r, ..., :-1], parts[r, ..., -1])
    return out.to(q.dtype)
