"""Expert parallelism across gloo processes against one process.

Layer level: the collectives, and FusedMoE over 3 EP ranks with uneven token counts (one rank
with none) and redundant replicas, against a per-token loop. Model level: tiny Mixtral and
Qwen-MoE (with a shared expert) over EP 2 and 4, with and without redundant experts placed from
the single-process run's load history, and TP 2 x EP 2; each rank loads only its experts
through the normal loader, and logits, greedy tokens and expert load counters must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from gloo_spawn import run_gloo
from model_harness import greedy, load_model, one_thread

from paraserve.config import ConfigError
from paraserve.distributed import comm, parallel_state
from paraserve.distributed.parallel_state import ParallelLayout
from paraserve.layers.eplb import ExpertPlacement, imbalance
from paraserve.layers.moe import FusedMoE

PROMPTS = [[1, 5, 9, 20, 33, 7, 100, 3, 55], [1, 200, 201, 17], list(range(3, 40)), [1, 300, 4, 77, 12]]
STEPS = 4
TOL = dict(atol=5e-5, rtol=5e-5)


# ---- layout and placement (no processes) -------------------------------------------------

def test_layout_groups_follow_vllm_order():
    lay = ParallelLayout.build(4, tp_size=2, enable_expert_parallel=True)
    assert (lay.dp, lay.ep, lay.etp) == (2, 4, 1)
    assert lay.group_ranks("tp") == [(0, 1), (2, 3)]
    assert lay.group_ranks("dp") == [(0, 2), (1, 3)]
    assert lay.group_ranks("ep") == [(0, 1, 2, 3)]
    lay = ParallelLayout(4, tp=2, ep=2)  # experts over the dp pairs, each split over tp
    assert lay.etp == 2 and lay.group_ranks("ep") == [(0, 2), (1, 3)]
    assert lay.group_ranks("etp") == [(0, 1), (2, 3)]
    lay = ParallelLayout(8, tp=2, cp=2)
    assert lay.group_ranks("cp") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert lay.coords(7) == (1, 1, 1) and lay.group_ranks("ep") == [(r,) for r in range(8)]
    with pytest.raises(ConfigError, match="multiple of dp x cp"):
        ParallelLayout(4, tp=1, ep=2)  # etp would span ranks that hold different tokens
    with pytest.raises(ConfigError, match="conflicts"):
        ParallelLayout.build(4, tp_size=2, ep_size=2, enable_expert_parallel=True)


def test_accessors_raise_until_initialised():
    parallel_state.destroy_parallel_state()
    with pytest.raises(RuntimeError, match="not initialised"):
        parallel_state.get_ep_group()
    parallel_state.init_single_process()
    assert parallel_state.get_ep_group().size == 1 and parallel_state.get_layout().world_size == 1


def test_greedy_placement_replicates_the_hottest_experts_and_balances_ranks():
    load = [90, 10, 10, 50, 5, 5, 20, 10]
    linear = ExpertPlacement.build(8, 4)
    assert linear.local_experts(1) == (2, 3)
    placed = ExpertPlacement.balanced(load, ep_size=4, num_redundant=4)
    table, counts = placed.replica_table()
    assert counts.tolist() == [4, 1, 1, 2, 1, 1, 1, 1]  # load per replica: 22.5 for 0, 25 for 3
    assert sorted(placed.physical_to_logical) == [0, 0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 7]
    for r in range(4):  # replicas of one expert sit on different ranks
        assert len(set(placed.local_experts(r))) == placed.num_local == 3
    assert imbalance(placed.rank_loads(load)) < 1.1 < imbalance(linear.rank_loads(load))
    with pytest.raises(ConfigError, match="divisible by the expert parallel size 4"):
        ExpertPlacement.balanced(load, ep_size=4, num_redundant=3)


# ---- layer level ---------------------------------------------------------------------------

E, K, H, I = 6, 2, 16, 24


def naive_moe(x, logits, w13, w2, renormalize: bool) -> torch.Tensor:
    """The obviously correct answer: a loop over tokens and their top-k experts."""
    probs = torch.softmax(logits.float(), -1)
    weights, experts = torch.topk(probs, K, -1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist()):
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += w * (w2[e] @ (F.silu(gate) * up))
    return out


def _layer_rank(rank: int, world: int) -> None:
    parallel_state.destroy_parallel_state()
    parallel_state.init_distributed(tp_size=1, ep_size=world)
    ep = parallel_state.get_ep_group()
    # collectives: counts first, then rows with uneven (and empty) splits
    sent = torch.tensor([10 * rank + j for j in range(world)])
    assert comm.exchange_counts(sent, ep).tolist() == [10 * j + rank for j in range(world)]
    splits = [[1, 0, 2], [0, 0, 0], [3, 1, 0]]  # splits[src][dst]
    rows = torch.arange(sum(splits[rank]), dtype=torch.float32).unsqueeze(-1) + 100 * rank
    got = comm.all_to_all(rows, ep, [splits[s][rank] for s in range(world)], splits[rank])
    want = [100 * s + sum(splits[s][:rank]) + i for s in range(world) for i in range(splits[s][rank])]
    assert got.squeeze(-1).tolist() == want
    gathered = comm.all_gather(torch.full((rank, 2), float(rank)), ep, dim=0, sizes=[0, 1, 2])
    assert gathered[:, 0].tolist() == [1.0, 2.0, 2.0]

    g = torch.Generator().manual_seed(0)  # the same expert weights on every rank
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 4
    g.manual_seed(rank + 1)
    tokens = [5, 0, 11][rank]
    x, logits = torch.randn(tokens, H, generator=g), torch.randn(tokens, E, generator=g)
    for placement in (None, ExpertPlacement.balanced([50, 1, 1, 30, 1, 1], world, num_redundant=3)):
        moe = FusedMoE(E, K, H, I, renormalize=placement is None, placement=placement)
        if placement is None:  # per-expert checkpoint tensors
            for e in range(E):
                moe.weight_loader(moe.w13, w13[e, :I], (e, "w1"))
                moe.weight_loader(moe.w13, w13[e, I:], (e, "w3"))
                moe.weight_loader(moe.w2, w2[e], (e, "w2"))
        else:  # stacked [E, ...] tensors (transformers 5 in-memory layout)
            moe.weight_loader(moe.w13, w13)
            moe.weight_loader(moe.w2, w2)
        out = moe(x, logits)
        torch.testing.assert_close(out, naive_moe(x, logits, w13, w2, placement is None),
                                   atol=1e-5, rtol=1e-5)
        slots = comm.all_gather(moe.slot_counts.clone(), ep, dim=0)
        routed = comm.all_reduce(moe.expert_counts.clone(), ep)
        assert int(slots.sum()) == int(routed.sum()) == K * 16  # every assignment ran once
    parallel_state.destroy_parallel_state()


def test_fused_moe_layer_over_three_ranks():
    run_gloo(_layer_rank, 3)


# ---- model level ---------------------------------------------------------------------------

@dataclass
class Reference:
    logits: list[torch.Tensor]
    tokens: list[list[int]]
    history: dict[int, list[int]]  # layer -> assignments per expert over the whole run


_REFS: dict[str, Reference] = {}


def reference(path) -> Reference:
    if str(path) not in _REFS:
        parallel_state.destroy_parallel_state()
        parallel_state.init_single_process()
        with one_thread():
            model = load_model(path)
            logits, tokens = greedy(model, PROMPTS, STEPS)
        history = {i: c.tolist() for i, c in model.expert_load().items()}
        _REFS[str(path)] = Reference(logits, tokens, history)
    return _REFS[str(path)]


def _check_load(model, ref: Reference, redundant: int) -> None:
    """The routers' counters add up to the reference's; every assignment ran on exactly one slot
    of its expert; with redundancy, the hottest expert's replicas shared its rows."""
    dp, ep = parallel_state.get_dp_group(), parallel_state.get_ep_group()
    for layer, moe in model.moe_layers().items():
        routed = comm.all_reduce(moe.expert_counts.clone(), dp)  # dp ranks hold different tokens
        assert routed.tolist() == ref.history[layer]
        slots = comm.all_gather(moe.slot_counts.clone(), ep, dim=0)  # [E + R]
        logical = torch.tensor(moe.placement.physical_to_logical)
        per_expert = torch.zeros(moe.num_experts, dtype=torch.long).index_add_(0, logical, slots)
        assert per_expert.tolist() == ref.history[layer]
        assert moe.imbalance == pytest.approx(imbalance(moe.expert_counts))
        if redundant:
            table, counts = moe.placement.replica_table()
            hot = max(range(moe.num_experts), key=lambda e: ref.history[layer][e])
            assert counts[hot] > 1
            assert (slots[table[hot, :counts[hot]]] > 0).all()


def _check_stacked_loading(model, path) -> None:
    """Stacked [E, ...] expert tensors (transformers 5's in-memory layout) load the same shard
    as the per-expert checkpoint tensors did."""
    from paraserve.models.loader import iter_weights, resolve_model

    layer, moe = next(iter(model.moe_layers().items()))
    per_expert = {}
    for name, tensor in iter_weights(resolve_model(str(path))):
        if f"layers.{layer}." in name and ".experts." in name:
            _, which = model.map_weight_name(name.removeprefix("model."))[1]
            per_expert[int(name.split(".experts.")[1].split(".")[0]), which] = tensor
    n = moe.num_experts
    w13 = torch.stack([torch.cat([per_expert[e, "w1"], per_expert[e, "w3"]]) for e in range(n)])
    w2 = torch.stack([per_expert[e, "w2"] for e in range(n)])
    for param, stacked in ((moe.w13, w13), (moe.w2, w2)):
        loaded = param.data.clone()
        param.data.zero_()
        moe.weight_loader(param, stacked)
        assert torch.equal(param.data, loaded)


def _model_rank(rank: int, world: int, path, tp: int, ep: int, redundant: int, ref: Reference) -> None:
    parallel_state.destroy_parallel_state()  # the forked parent's single-process groups
    layout = parallel_state.init_distributed(tp_size=tp, ep_size=ep)
    mine = list(range(len(PROMPTS)))[layout.coords(rank)[0]::layout.dp]  # this dp rank's requests
    variants = [{}]
    if redundant:
        variants.append(dict(num_redundant_experts=redundant, expert_load=ref.history))
    for kw in variants:
        reads: list = []
        model = load_model(path, counter=reads, **kw)
        assert reads[0].elements == sum(p.numel() for p in model.parameters())  # its shard only
        logits, tokens = greedy(model, [PROMPTS[i] for i in mine], STEPS)
        for i, got in zip(mine, logits):
            torch.testing.assert_close(got, ref.logits[i], **TOL)
        assert tokens == [ref.tokens[i] for i in mine]
        _check_load(model, ref, redundant if kw else 0)
        _check_stacked_loading(model, path)
    parallel_state.destroy_parallel_state()


@pytest.mark.parametrize("arch,world,tp,ep,redundant", [
    ("mixtral", 2, 1, 2, 2),  # pure EP: 2 dp ranks, each with its own requests
    ("mixtral", 4, 1, 4, 4),
    ("qwen2-moe", 2, 1, 2, 2),  # shared expert with its sigmoid gate
    ("qwen2-moe", 4, 1, 4, 4),
    ("qwen2-moe", 2, 2, 2, 2),  # TP 2 x EP 2 (vLLM's enable_expert_parallel): token slices per tp rank
    ("mixtral", 4, 2, 2, 2),  # TP 2 x EP 2 over dp 2: experts partitioned over dp, split over tp
    ("qwen3-moe", 4, 2, 4, 0),  # TP 2 x EP 4 over dp 2; norm_topk_prob
    ("qwen3-moe", 2, 2, 1, 0),  # TP 2 without EP: every expert split over tp
])
def test_expert_parallel_model(arch, world, tp, ep, redundant, tiny_model_dir):
    path = tiny_model_dir(arch)
    run_gloo(_model_rank, world, path, tp, ep, redundant, reference(path))
