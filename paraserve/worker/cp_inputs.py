"""A step's inputs under context parallelism (cp > 1): which tokens this CP rank runs and where
its share of the KV cache lives.

KV storage is striped by position: position p belongs to CP rank p % cp. A scheduler block
holds block_size x cp positions and each rank stores its block_size of them in its own cache
block of the same id (local slot = block_id * block_size + (p % (block_size * cp)) // cp). So each
rank keeps 1/cp of every request's KV, and a block's owners do not depend on how it was computed:
prefix-cache hits, chunked prefill and preemption need nothing special.

Two kinds of requests share a step:
- ring: a prefill chunk of at least RING_MIN_TOKENS (no prompt logprobs). Its tokens are split
  zigzag over the CP ranks (2 x cp chunks, rank i takes chunks i and 2cp-1-i); each rank runs
  only its share through the model and attention is ring attention (layers/ring_attention.py).
  A rank's ring block is its share of the chunk's K/V plus the cached context positions it
  holds (prefix-cache hits, earlier chunks): as the blocks pass every rank, every query sees the
  whole context and the causal part of the chunk, and each rank stores the new positions it owns.
- replicated: decodes and small chunks. Every CP rank runs all the request's new tokens; the
  owner of each new position stores its K/V; each rank attends over the positions it holds and
  the partial results merge by log-sum-exp (decode_attention_cp).
The last token of a ring chunk lives on one rank; its hidden state is summed over the CP group
(zeros elsewhere) before the logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from paraserve.distributed.parallel_state import GroupInfo
from paraserve.distributed.ring import RingStats
from paraserve.layers.ring_attention import PAD_POSITION, shard_positions


# Below this many new tokens a request runs replicated: its zigzag shares would be mostly
# padding, and passing the cached context around the ring would cost more than merging the
# partial attention of a few queries (Meta's CP inference chooses pass-Q for such chunks too).
RING_MIN_TOKENS = 16


@dataclass
class RingPart:
    """This rank's zigzag share of one prefill chunk (positions first_new .. first_new + n - 1)."""
    start: int  # its tokens in the rank's batch: [start, start + len(positions))
    positions: torch.Tensor  # [n_local] global positions, PAD_POSITION for padding
    first_new: int  # the chunk's first position; earlier ones are cached context
    slot_of: torch.Tensor  # [n] local slot of each chunk position this rank owns, else -1
    # the cached context positions this rank holds, padded to the same count on every rank
    ctx_slots: Optional[torch.Tensor] = None  # [c] local slots (0 in padding)
    ctx_positions: Optional[torch.Tensor] = None  # [c] positions, PAD_POSITION in padding


@dataclass
class CPStep:
    """What the CP-aware attention path reads (travels in AttentionMetadata.scratch["cp"])."""
    group: GroupInfo
    local_size: Optional[int]  # BurstAttention two-level ring: ranks per node
    stats: Optional[RingStats] = None  # the ring's bytes and overlap, accumulated over steps
    rings: list[RingPart] = field(default_factory=list)
    write_tokens: Optional[torch.Tensor] = None  # [W] replicated tokens whose K/V this rank stores
    write_slots: Optional[torch.Tensor] = None  # [W] where
    rep_tokens: Optional[torch.Tensor] = None  # [R] batch indices of the replicated tokens
    key_slots: Optional[torch.Tensor] = None  # [K] slots of the keys this rank holds for them
    rep_mask: Optional[torch.Tensor] = None  # [R, K] bool: same request, key position <= query's


    def to(self, device: torch.device) -> "CPStep":
        """The index tensors on the model's device (built on the host)."""
        if device.type == "cpu":
            return self
        for part in self.rings:
            part.positions, part.slot_of = part.positions.to(device), part.slot_of.to(device)
            if part.ctx_slots is not None:
                part.ctx_slots, part.ctx_positions = part.ctx_slots.to(device), part.ctx_positions.to(device)
        for name in ("write_tokens", "write_slots", "rep_tokens", "key_slots", "rep_mask"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self


@dataclass
class CPPlan:
    input_ids: list[int]
    positions: list[int]  # rotary positions (padding: 0)
    step: CPStep
    # per request (scheduler order): where its last computed token's hidden state is on this
    # rank, or None when another CP rank holds it (a ring prompt's tail)
    last_token: list[Optional[int]]
    ring_requests: set[int]  # request indices run as ring prompts
    starts: list[int]  # per request, its first token in this rank's batch (replicated ones)


def local_slot(block_ids: Sequence[int], pos: int, block_size: int, cp: int) -> int:
    span = block_size * cp
    return block_ids[pos // span] * block_size + (pos % span) // cp


def plan_step(reqs: Sequence[tuple[list[int], list[int], int, int, bool]], group: GroupInfo,
              block_size: int, local_size: Optional[int], stats: Optional[RingStats] = None) -> CPPlan:
    """reqs: per scheduled request (token_ids, block_ids, num_computed, num_new, may_ring)."""
    cp, me = group.size, group.rank
    ids: list[int] = []
    rope: list[int] = []
    step = CPStep(group, local_size, stats)
    last: list[Optional[int]] = []
    ring_reqs: set[int] = set()
    starts: list[int] = []
    write_tok: list[int] = []
    write_slot: list[int] = []
    rep_tok: list[int] = []
    keys: list[list[int]] = []  # per replicated request: the slots of the keys this rank holds
    key_pos: list[list[int]] = []
    q_pos: list[list[int]] = []
    for i, (tokens, blocks, s, n, may_ring) in enumerate(reqs):
        starts.append(len(ids))
        if may_ring and n >= RING_MIN_TOKENS:
            ring_reqs.add(i)
            step.rings.append(_ring_part(len(ids), blocks, s, n, cp, me, block_size))
            rel = shard_positions(n, cp, me).tolist()  # [2 * ceil(n / 2cp)] chunk offsets
            last.append(len(ids) + rel.index(n - 1) if n - 1 in rel else None)
            ids.extend(tokens[s + r] if r != PAD_POSITION else 0 for r in rel)
            rope.extend(s + r if r != PAD_POSITION else 0 for r in rel)
            continue
        base = len(ids)
        for p in range(s, s + n):
            if p % cp == me:
                write_tok.append(base + p - s)
                write_slot.append(local_slot(blocks, p, block_size, cp))
        rep_tok.extend(range(base, base + n))
        held = list(range(me, s + n, cp))
        keys.append([local_slot(blocks, p, block_size, cp) for p in held])
        key_pos.append(held)
        q_pos.append(list(range(s, s + n)))
        last.append(base + n - 1)
        ids.extend(tokens[s:s + n])
        rope.extend(range(s, s + n))
    if rep_tok:
        step.write_tokens = torch.tensor(write_tok, dtype=torch.long)
        step.write_slots = torch.tensor(write_slot, dtype=torch.long)
        step.rep_tokens = torch.tensor(rep_tok, dtype=torch.long)
        step.key_slots = torch.tensor([x for ks in keys for x in ks], dtype=torch.long)
        step.rep_mask = _block_causal_mask(q_pos, key_pos)
    return CPPlan(ids, rope, step, last, ring_reqs, starts)


def _ring_part(start: int, blocks: Sequence[int], s: int, n: int, cp: int, me: int,
               block_size: int) -> RingPart:
    rel = shard_positions(n, cp, me)
    positions = torch.where(rel == PAD_POSITION, rel, rel + s)
    owned = [p for p in range(s, s + n) if p % cp == me]
    slot_of = torch.full((n,), -1, dtype=torch.long)
    slot_of[[p - s for p in owned]] = torch.tensor([local_slot(blocks, p, block_size, cp) for p in owned],
                                                   dtype=torch.long)
    part = RingPart(start, positions, s, slot_of)
    if s:
        held = list(range(me, s, cp))
        pad = -(-s // cp) - len(held)  # rank 0 holds the most context positions
        part.ctx_slots = torch.tensor([local_slot(blocks, p, block_size, cp) for p in held] + [0] * pad,
                                      dtype=torch.long)
        part.ctx_positions = torch.tensor(held + [PAD_POSITION] * pad, dtype=torch.long)
    return part


def _block_causal_mask(q_pos: list[list[int]], k_pos: list[list[int]]) -> torch.Tensor:
    """[sum q, sum k] bool: request r's queries see request r's keys at positions <= theirs."""
    mask = torch.zeros(sum(map(len, q_pos)), sum(map(len, k_pos)), dtype=torch.bool)
    qi = ki = 0
    for qs, ks in zip(q_pos, k_pos):
        if ks:
            q = torch.tensor(qs).unsqueeze(1)
            k = torch.tensor(ks).unsqueeze(0)
            mask[qi:qi + len(qs), ki:ki + len(ks)] = k <= q
        qi += len(qs)
        ki += len(ks)
    return mask
