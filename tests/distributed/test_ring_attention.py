"""Ring attention (zigzag / contiguous, flat / two-level) and CP decode vs plain SDPA."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_spawn import run_gloo
from torch.testing import assert_close

from paraserve.distributed.parallel_state import GroupInfo
from paraserve.distributed.ring import RingStats
from paraserve.layers.ring_attention import (PAD_POSITION, attention_with_lse,
                                             decode_attention_cp, merge_lse, restore_sequence,
                                             ring_attention, shard_positions, shard_sequence)

H, KVH, D = 4, 2, 16
SCALE = D ** -0.5
TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(t: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, H, D, generator=g, dtype=dtype),
            torch.randn(t, KVH, D, generator=g, dtype=dtype),
            torch.randn(t, KVH, D, generator=g, dtype=dtype))


def _sdpa(q, k, v, causal: bool = False, mask=None) -> torch.Tensor:
    """The plain single-device answer: [T, H, D] layout in and out."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], attn_mask=mask,
                                       is_causal=causal, scale=SCALE, enable_gqa=True)
    return o[0].transpose(0, 1)


# ---- single process ----

def test_attention_with_lse_matches_sdpa():
    q, k, v = _qkv(23, 0)
    mask = torch.ones(23, 23, dtype=torch.bool).tril()
    out, lse = attention_with_lse(q, k, v, SCALE, mask)
    assert_close(out, _sdpa(q, k, v, causal=True), **TOL)
    assert lse.shape == (23, H)


def test_merge_lse_equals_full_attention_and_handles_fully_masked_rows():
    q, k, v = _qkv(12, 1)
    mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[3, :6] = False  # row 3 sees nothing in the first half
    mask[5, :] = False  # row 5 sees nothing at all
    full_out, full_lse = attention_with_lse(q, k, v, SCALE, mask)
    a = attention_with_lse(q, k[:6], v[:6], SCALE, mask[:, :6])
    b = attention_with_lse(q, k[6:], v[6:], SCALE, mask[:, 6:])
    out, lse = merge_lse(*a, *b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out, full_out, **TOL)
    assert_close(lse, full_lse, **TOL)
    assert (out[5] == 0).all() and (lse[5] == float("-inf")).all()
    assert_close(out[3], b[0][3], **TOL)


def test_shard_restore_round_trip():
    for t in (1, 5, 16, 37, 101):
        x = torch.arange(t * 3).reshape(t, 3)
        for cp in (1, 2, 3, 4):
            for zigzag in (True, False):
                shards = [shard_sequence(x, cp, r, zigzag) for r in range(cp)]
                assert len({s.shape[0] for s in shards}) == 1  # equal lengths for the ring
                assert torch.equal(restore_sequence(shards, t, zigzag), x)
                pos = torch.cat([shard_positions(t, cp, r, zigzag) for r in range(cp)])
                assert torch.equal(pos[pos != PAD_POSITION].sort().values, torch.arange(t))
    # zigzag: rank i holds chunks i and 2*cp-1-i
    assert shard_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # T=5, cp=2: chunks of 2, the 3 padding slots land in chunk 3 (rank 0) and 2 (rank 1)
    assert shard_positions(5, 2, 0).tolist() == [0, 1, PAD_POSITION, PAD_POSITION]


def test_ring_attention_single_rank_is_plain_attention():
    q, k, v = _qkv(19, 3, torch.bfloat16)
    pos = torch.arange(19)
    out = ring_attention(q, k, v, pos, pos, GroupInfo("cp"), SCALE)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), _sdpa(q.float(), k.float(), v.float(), causal=True),
                 atol=2e-2, rtol=2e-2)


# ---- several gloo processes ----

def _check_ring(rank: int, cp: int, group: GroupInfo, t: int, zigzag: bool, causal: bool,
                local_size) -> None:
    q, k, v = _qkv(t, seed=t)  # same seed on every rank: each shards the same sequence
    ref = _sdpa(q, k, v, causal=causal)
    pos = shard_positions(t, cp, rank, zigzag)
    stats = RingStats()
    out = ring_attention(*(shard_sequence(x, cp, rank, zigzag) for x in (q, k, v)), pos, pos,
                         group, SCALE, causal=causal, local_size=local_size, stats=stats)
    case = f"rank={rank} cp={cp} T={t} zigzag={zigzag} causal={causal} local={local_size}"
    real = pos != PAD_POSITION
    assert_close(out[real], shard_sequence(ref, cp, rank, zigzag)[real], **TOL, msg=case)
    if causal:  # padding queries see nothing and come out as zeros
        assert (out[~real] == 0).all(), case
    n = pos.shape[0]
    block_bytes = n * KVH * D * 4 * 2 + n * 8  # k and v in float32, positions in int64
    assert stats.bytes_sent == (cp - 1) * block_bytes, case  # flat and two-level alike
    assert stats.transfers == cp - 1 and 0.0 <= stats.hidden_fraction <= 1.0, case
    if causal and not zigzag:  # later ranks' blocks are all in the future of this one
        assert stats.skipped_blocks == cp - 1 - rank, case


def _check_decode(rank: int, cp: int, group: GroupInfo) -> None:
    s = 53
    q, k, v = _qkv(s, seed=7)
    q_pos = torch.tensor([20, s - 1])  # a row whose keys lie entirely on the first ranks
    mask = torch.arange(s).unsqueeze(0) <= q_pos.unsqueeze(1)  # [2, S]
    ref = _sdpa(q[q_pos], k, v, mask=mask)
    # uneven KV shards: decode gathers (out, lse), never K/V, so lengths may differ
    ks, vs, ms = (torch.tensor_split(x, cp, dim=d)[rank] for x, d in ((k, 0), (v, 0), (mask, 1)))
    assert_close(decode_attention_cp(q[q_pos], ks, vs, group, SCALE, ms), ref, **TOL)
    assert_close(decode_attention_cp(q[-1:], ks, vs, group, SCALE), _sdpa(q[-1:], k, v), **TOL)


def _ring_worker(rank: int, cp: int, local_sizes: tuple) -> None:
    group = GroupInfo("cp", cp, rank, dist.group.WORLD)
    for t in (37, 101):
        for zigzag in (True, False):
            for causal in (True, False):
                for local_size in local_sizes:
                    _check_ring(rank, cp, group, t, zigzag, causal, local_size)
    _check_decode(rank, cp, group)


def test_ring_attention_cp2():
    run_gloo(_ring_worker, 2, (None,))


def test_ring_attention_cp4_flat_and_two_level():
    run_gloo(_ring_worker, 4, (None, 2))  # 2: two nodes x two local ranks
