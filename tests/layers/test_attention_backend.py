"""The torch reference backend over a paged cache against naive attention on dense tensors:
mixed decode / prefill-chunk batches, scattered blocks, GQA, and a per-request tree mask."""
import math

import torch

from paraserve.attention.backend import AttentionMetadata, get_backend

H, KVH, D, BS, NB = 4, 2, 8, 4, 64


def naive(q, k, v, allowed):
    """q [n, H, D], k/v [L, KVH, D], allowed [n, L] -> [n, H, D]."""
    k = k.repeat_interleave(H // KVH, dim=1)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(computed, new, tree_masks):
    torch.manual_seed(0)
    cache = torch.zeros(2, NB, BS, KVH, D)
    perm = torch.randperm(NB)  # blocks scattered over the pool
    tables, ctx_k, ctx_v, used = [], [], [], 0
    for c, n in zip(computed, new):
        nblocks = -(-(c + n) // BS)
        blocks = perm[used:used + nblocks]
        used += nblocks
        tables.append(blocks)
        k, v = torch.randn(c + n, KVH, D), torch.randn(c + n, KVH, D)
        slots = blocks[torch.arange(c) // BS] * BS + torch.arange(c) % BS
        cache[0].view(-1, KVH, D)[slots] = k[:c]
        cache[1].view(-1, KVH, D)[slots] = v[:c]
        ctx_k.append(k)
        ctx_v.append(v)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], H, D)
    k_new = torch.cat([k[c:] for k, c in zip(ctx_k, computed)])
    v_new = torch.cat([v[c:] for v, c in zip(ctx_v, computed)])
    slot_mapping = torch.cat([t[torch.arange(c, c + n) // BS] * BS + torch.arange(c, c + n) % BS
                              for t, c, n in zip(tables, computed, new)])
    width = max(len(t) for t in tables)
    table = torch.stack([torch.cat([t, t.new_zeros(width - len(t))]) for t in tables])
    decode = [i for i, n in enumerate(new) if n == 1 and i not in tree_masks]
    meta = AttentionMetadata(
        num_reqs=len(new), positions=torch.zeros(starts[-1], dtype=torch.long), slot_mapping=slot_mapping,
        block_tables=table, query_start_loc=starts, seq_lens=[c + n for c, n in zip(computed, new)],
        decode_reqs=torch.tensor(decode, dtype=torch.long),
        decode_tokens=torch.tensor([starts[i] for i in decode], dtype=torch.long),
        decode_seq_lens=torch.tensor([computed[i] + 1 for i in decode], dtype=torch.long),
        other_reqs=[i for i in range(len(new)) if i not in decode], custom_masks=tree_masks or None)
    out = get_backend("torch").forward(q, k_new, v_new, cache, meta, D ** -0.5)
    for i, (c, n) in enumerate(zip(computed, new)):
        allowed = torch.ones(n, c + n, dtype=torch.bool).tril(c)
        if i in tree_masks:
            allowed[:, c:] = tree_masks[i]
        ref = naive(q[starts[i]:starts[i + 1]], ctx_k[i], ctx_v[i], allowed)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]], ref, atol=1e-5, rtol=1e-5)


def test_mixed_decodes_and_prefill_chunks():
    run_case(computed=[0, 7, 13, 0, 30], new=[9, 1, 1, 5, 6], tree_masks={})


def test_tree_mask_over_new_tokens():
    # root, two children of root, one grandchild under the first child: ancestor-only visibility
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    run_case(computed=[10, 5], new=[4, 1], tree_masks={0: tree})
