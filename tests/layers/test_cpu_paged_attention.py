"""The compiled CPU paged decode kernel against naive attention over the logical sequence, and
the "cpu" backend against the torch reference backend on mixed batches (decodes, prefill chunks,
a tree). In the kernel tests, cache slots no request owns hold NaN, so reading past a sequence
fails."""
import logging

import pytest
import torch

from paraserve.attention import cpu_paged
from paraserve.ops import cpu
from paraserve.attention.backend import AttentionMetadata, default_backend_name, get_backend

BS = 16
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def kernel():
    module = cpu.kernels()
    if module is None:
        pytest.skip("the CPU paged attention kernel cannot be compiled here (see the log warning)")
    return module


@pytest.fixture(params=["vector", "amx"])
def path(request, kernel):
    """The kernel's bf16 path: AMX tiles where the CPU has them (and then by default), else the
    vector path. Float32 always takes the vector path."""
    if request.param == "amx" and not cpu.amx_available():
        pytest.skip("this CPU has no AMX tiles")
    before = kernel.set_amx_attention(request.param == "amx")
    yield request.param
    kernel.set_amx_attention(before)


def scattered_cache(seq_lens, kvh, d, dtype, fill=float("nan"), spare_blocks=3, bs=BS):
    """A cache [2, NB, bs, KVH, D] filled with `fill`, holding each sequence's random K/V in
    randomly scattered blocks; returns it, the zero-padded block tables and the per-sequence K/V."""
    BS = bs  # noqa: N806
    nblocks = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(nblocks) + spare_blocks
    cache = torch.full((2, num_blocks, BS, kvh, d), fill, dtype=dtype)
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), max(max(nblocks), 1), dtype=torch.long)
    kv, used = [], 0
    for i, n in enumerate(seq_lens):
        blocks = perm[used:used + nblocks[i]]
        used += nblocks[i]
        tables[i, :len(blocks)] = blocks
        k, v = torch.randn(n, kvh, d).to(dtype), torch.randn(n, kvh, d).to(dtype)
        slots = blocks[torch.arange(n) // BS] * BS + torch.arange(n) % BS
        cache[0].view(-1, kvh, d)[slots] = k
        cache[1].view(-1, kvh, d)[slots] = v
        kv.append((k, v))
    return cache, tables, kv


def naive_decode(q, k, v, scale):
    """q [H, D], k/v [L, KVH, D] -> [H, D], in float64."""
    g = q.shape[0] // k.shape[1]
    k, v = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    p = (torch.einsum("hd,lhd->hl", q.double(), k) * scale).softmax(-1)
    return torch.einsum("hl,lhd->hd", p, v)


@pytest.mark.parametrize("dtype, seq_lens, h, kvh, d", [
    (torch.float32, [300], 9, 3, 64),
    (torch.float32, [1, 15, 16, 17, 300, 31, 32, 33, 64, 2, 129, 250, 5], 9, 3, 64),
    (torch.bfloat16, [1, 15, 16, 17, 300, 31, 32, 33, 64, 2, 129, 250, 5], 9, 3, 64),
    (torch.float32, [1, 15, 16, 17, 200, 31, 32, 33, 64, 2, 129, 250, 5], 8, 1, 80),  # MQA, runtime D
    (torch.bfloat16, [17, 1, 100], 4, 2, 128),
    (torch.bfloat16, [33, 7], 8, 2, 64),  # bf16 pair path: 4 heads per KV head
    (torch.bfloat16, [18, 3], 2, 2, 64),  # one head per KV head
    (torch.bfloat16, [40], 16, 2, 64),  # 8 heads per KV head: the widening path
])
def test_kernel_matches_naive_attention(kernel, path, dtype, seq_lens, h, kvh, d):
    torch.manual_seed(0)
    cache, tables, kv = scattered_cache(seq_lens, kvh, d, dtype)
    q = torch.randn(len(seq_lens), h, d).to(dtype)
    scale = d ** -0.5
    out = cpu_paged.paged_decode_attention(q, cache[0], cache[1], tables, torch.tensor(seq_lens), scale)
    assert out.dtype == dtype and out.shape == q.shape
    for i, (k, v) in enumerate(kv):
        ref = naive_decode(q[i], k, v, scale).to(dtype)
        torch.testing.assert_close(out[i], ref, **TOL[dtype], msg=lambda m: f"request {i}: {m}")


def test_kernel_rejects_a_block_outside_the_cache(kernel):
    cache, tables, _ = scattered_cache([20], 1, 16, torch.float32)
    tables[0, 1] = cache.shape[1]
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_paged.paged_decode_attention(torch.randn(1, 2, 16), cache[0], cache[1], tables, torch.tensor([20]), 1.0)


def mixed_batch(computed, new, tree_masks, h, kvh, d, dtype):
    """Each request has `computed` tokens in the cache and `new` ones in the batch; requests with
    one new token and no tree are the decode group. -> q, k_new, v_new, cache, meta."""
    torch.manual_seed(0)
    # zero, not NaN: the reference's padded decode gather reads unowned slots (masked, but 0 * NaN)
    cache, tables, kv = scattered_cache([c + n for c, n in zip(computed, new)], kvh, d, dtype, fill=0.0)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    slot_mapping = torch.cat([t[torch.arange(c, c + n) // BS] * BS + torch.arange(c, c + n) % BS
                              for t, c, n in zip(tables, computed, new)])
    cache.view(2, -1, kvh, d)[:, slot_mapping] = 0  # the backend must write the new tokens
    k_new = torch.cat([k[c:] for (k, _), c in zip(kv, computed)])
    v_new = torch.cat([v[c:] for (_, v), c in zip(kv, computed)])
    decode = [i for i, n in enumerate(new) if n == 1 and i not in tree_masks]
    meta = AttentionMetadata(
        num_reqs=len(new), positions=torch.zeros(starts[-1], dtype=torch.long), slot_mapping=slot_mapping,
        block_tables=tables, query_start_loc=starts, seq_lens=[c + n for c, n in zip(computed, new)],
        decode_reqs=torch.tensor(decode, dtype=torch.long),
        decode_tokens=torch.tensor([starts[i] for i in decode], dtype=torch.long),
        decode_seq_lens=torch.tensor([computed[i] + 1 for i in decode], dtype=torch.long),
        other_reqs=[i for i in range(len(new)) if i not in decode], custom_masks=tree_masks or None)
    return torch.randn(starts[-1], h, d).to(dtype), k_new, v_new, cache, meta


TREE = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
# decodes at 1, 16, 17, 200 tokens; fresh prompts; prefill chunks; a tree after 21 tokens
COMPUTED, NEW = [0, 15, 16, 40, 21, 0, 199, 33, 0], [9, 1, 1, 7, 4, 1, 1, 16, 5]


def forward_both(dtype, h, kvh, d):
    """The reference's and the "cpu" backend's outputs and caches for one mixed batch, the "cpu"
    one run twice (a second layer reuses the step's scratch) -> (ref, ref_cache, outs, cache, meta)."""
    q, k, v, cache, meta = mixed_batch(COMPUTED, NEW, {4: TREE}, h, kvh, d, dtype)
    ref_cache, ref_meta = cache.clone(), AttentionMetadata(**{**vars(meta), "scratch": {}})
    ref = get_backend("torch").forward(q, k, v, ref_cache, ref_meta, d ** -0.5)
    backend = get_backend("cpu")
    outs = [backend.forward(q, k, v, cache, meta, d ** -0.5) for _ in range(2)]
    return ref, ref_cache, outs, cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [4, 5, 32])
def test_kernel_with_blocks_that_do_not_match_its_tiles(kernel, path, dtype, bs):
    """The kernel walks the block table a tile (16 tokens) at a time: blocks smaller, of odd
    size or larger than a tile start and end inside tiles."""
    torch.manual_seed(1)
    seq_lens = [1, 4, 5, 15, 16, 17, 33, 70, 129]
    cache, tables, kv = scattered_cache(seq_lens, 3, 64, dtype, bs=bs)
    q = torch.randn(len(seq_lens), 9, 64).to(dtype)
    out = cpu_paged.paged_decode_attention(q, cache[0], cache[1], tables, torch.tensor(seq_lens), 0.125)
    for i, (k, v) in enumerate(kv):
        ref = naive_decode(q[i], k, v, 0.125).to(dtype)
        torch.testing.assert_close(out[i], ref, **TOL[dtype], msg=lambda m: f"request {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_reference_on_a_mixed_batch(kernel, dtype):
    ref, ref_cache, outs, cache, meta = forward_both(dtype, 9, 3, 64)
    plan = meta.scratch["cpu_plan"]  # decodes and the tree went through the kernel
    assert plan.rows.tolist() == [9, 10, 18, 19, 20, 21, 22, 23] and plan.tree_reqs == {4}
    for out in outs:
        torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0)


def test_backend_falls_back_for_a_head_dim_the_kernel_lacks(kernel):
    ref, ref_cache, outs, cache, meta = forward_both(torch.float32, 4, 2, 6)  # not a multiple of 4
    assert "cpu_decode_tables" not in meta.scratch
    for out in outs:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_default_backend_is_the_kernel_on_cpu(kernel):
    assert default_backend_name(torch.device("cpu")) == "cpu"
    assert default_backend_name(torch.device("cuda")) == "torch"


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # not caplog: the engine's log setup stops "paraserve" propagating
    cpu.logger.addHandler(handler)
    try:
        assert cpu.kernels.__wrapped__() is None
    finally:
        cpu.logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "using plain torch" in warnings[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_accepted_tree_path_attends_exactly_as_decoding(kernel, path, dtype):
    """Node j of a chain verified as a tree sees the same keys in the same order as a decode at
    that position: the outputs are bit-identical, which keeps greedy output unchanged by
    speculation in bfloat16 too. The chain's nodes sit in scattered (non-consecutive) slots."""
    torch.manual_seed(1)
    kvh, h, d, ctx, n = 3, 9, 64, 37, 4
    cache, tables, _ = scattered_cache([ctx + 2 * n], kvh, d, dtype, fill=0.0)
    cache.view(2, -1, kvh, d).normal_()
    q = torch.randn(n, h, d).to(dtype)
    flat = tables[0, torch.arange(ctx + 2 * n) // BS] * BS + torch.arange(ctx + 2 * n) % BS
    tree_slots = flat[ctx:ctx + 2 * n:2]  # the tree's nodes, every other slot after the context
    chain = torch.ones(n, n, dtype=torch.bool).tril()
    extra = torch.stack([torch.where(chain[j], tree_slots, 0) for j in range(n)])
    out = cpu_paged.paged_decode_attention(q, cache[0], cache[1], tables.expand(n, -1), torch.full((n,), ctx),
                                           0.125, extra, chain.sum(1))
    for j in range(n):  # plain decode of position ctx + j, its path copied where decoding keeps it
        decoded = cache.clone()
        decoded.view(2, -1, kvh, d)[:, flat[ctx:ctx + j + 1]] = cache.view(2, -1, kvh, d)[:, tree_slots[:j + 1]]
        ref = cpu_paged.paged_decode_attention(q[j:j + 1], decoded[0], decoded[1], tables, torch.tensor([ctx + j + 1]),
                                               0.125)
        torch.testing.assert_close(out[j:j + 1], ref, atol=0, rtol=0)


def tree_queries(parents, ctx, table, bs=BS):
    """A tree after ctx tokens (parents[j] < j, -1 for the root's children) in the slots right
    after the context -> its nodes' extra slots (ancestors and self, depth order), their count,
    and each node's path of node indices."""
    paths = []
    for j, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else []) + [j])
    slots = [int(table[(ctx + j) // bs]) * bs + (ctx + j) % bs for j in range(len(parents))]
    width = max(len(p) for p in paths)
    extra = torch.tensor([[slots[a] for a in p] + [0] * (width - len(p)) for p in paths])
    return extra, torch.tensor([len(p) for p in paths]), paths, slots


@pytest.mark.parametrize("ctx, h, kvh, d, parents", [
    *[(ctx, 9, 3, 64, None) for ctx in [3, 31, 32, 33, 63, 100, 250, 520]],
    (47, 4, 2, 128, None),  # 2 heads per KV head, D 128
    (64, 8, 2, 64, [-1, 0, 1, 0, 3]),  # 4 heads per KV head; 5 nodes: chunks of 3 and 2
    (80, 2, 2, 64, [-1, 0, 0, 1, 2, 3, 4]),  # one head per KV head; 7 nodes: 3 and 4
    (16, 9, 3, 64, [-1, 0]),  # two nodes: each on its own
])
def test_every_tree_node_attends_exactly_as_decoding(kernel, path, ctx, h, kvh, d, parents):
    """A branching tree (14 nodes unless given), batched with a decode query and a second tree
    (the AMX path shares context chunks within a tree, and the vector path the context's full
    tiles among up to 4 nodes, not across requests): every node, not only a chain, gets
    bit-identically what a decode of its path's last token computes with the path copied into
    place. Context lengths around the 16-key tiles and 32-key chunks, and other head layouts."""
    torch.manual_seed(ctx)
    dtype = torch.bfloat16
    parents = parents or [-1, -1, 0, 0, 1, 2, 2, 3, 5, 5, 6, 8, 9, 11]  # depths up to 6
    other = [-1, 0, 0]
    n = len(parents)
    cache, tables, _ = scattered_cache([ctx + n, ctx + 40, 2 * ctx + 5], kvh, d, dtype, fill=0.0)
    cache.view(2, -1, kvh, d).normal_()
    extra, extra_lens, paths, slots = tree_queries(parents, ctx, tables[0])
    extra2, extra_lens2, _, _ = tree_queries(other, 2 * ctx + 2, tables[2])
    width = max(extra.shape[1], extra2.shape[1])
    q = torch.randn(n + 1 + len(other), h, d).to(dtype)
    out = cpu_paged.paged_decode_attention(
        q, cache[0], cache[1], torch.cat([tables[:1].expand(n, -1), tables[1:2], tables[2:].expand(len(other), -1)]),
        torch.tensor([ctx] * n + [ctx + 40] + [2 * ctx + 2] * len(other)), 0.125,
        torch.cat([nn_pad(extra, width), torch.zeros(1, width, dtype=torch.long), nn_pad(extra2, width)]),
        torch.cat([extra_lens, torch.zeros(1, dtype=torch.long), extra_lens2]))
    flat = tables[0, torch.arange(ctx + n) // BS] * BS + torch.arange(ctx + n) % BS
    for j, nodes in enumerate(paths):
        decoded = cache.clone()
        where = flat[ctx:ctx + len(nodes)]
        decoded.view(2, -1, kvh, d)[:, where] = cache.view(2, -1, kvh, d)[:, [slots[a] for a in nodes]]
        ref = cpu_paged.paged_decode_attention(q[j:j + 1], decoded[0], decoded[1], tables[:1],
                                               torch.tensor([ctx + len(nodes)]), 0.125)
        torch.testing.assert_close(out[j:j + 1], ref, atol=0, rtol=0, msg=lambda m: f"node {j}: {m}")
    alone = cpu_paged.paged_decode_attention(q[n:n + 1], cache[0], cache[1], tables[1:2], torch.tensor([ctx + 40]),
                                             0.125)
    torch.testing.assert_close(out[n:n + 1], alone, atol=0, rtol=0)


def nn_pad(x, width):
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def test_the_amx_path_is_close_to_the_vector_path(kernel):
    """The two bf16 paths round differently (which is why a process keeps to one), but both
    compute the same attention: close on a mixed batch of decodes and a tree."""
    if not cpu.amx_available():
        pytest.skip("this CPU has no AMX tiles")
    torch.manual_seed(0)
    seq_lens = [1, 17, 31, 32, 33, 100, 300, 300, 300]
    cache, tables, _ = scattered_cache(seq_lens, 3, 64, torch.bfloat16)
    tables[7:] = tables[6]  # three queries over one context: a group the AMX path shares
    q = torch.randn(len(seq_lens), 9, 64).to(torch.bfloat16)
    outs = []
    for on in (True, False):
        before = kernel.set_amx_attention(on)
        try:
            outs.append(cpu_paged.paged_decode_attention(q, cache[0], cache[1], tables, torch.tensor(seq_lens), 0.125))
        finally:
            kernel.set_amx_attention(before)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)
