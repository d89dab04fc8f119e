"""Tree verification: greedy against brute force, sampling against the target distribution."""
import copy
import dataclasses
import math
import random

import pytest
import torch

from paraserve.spec_decode import rejection_sampler as rs
from paraserve.spec_decode.ngram import NgramProposer
from paraserve.spec_decode.rejection_sampler import verify_greedy, verify_sampling
from paraserve.spec_decode.tree import DraftTree, PackedTrees, pack_trees


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # ops on [TRIALS, V] are tiny: waking a second thread costs more than the work, and far
    # more on a CPU shared with other jobs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_beams(rng: random.Random, vocab: int, max_w: int = 6, max_l: int = 4
                 ) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(0, max_l))]
            for _ in range(rng.randint(0, max_w))]


def walk_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Plain greedy decoding, one token at a time, following the tree while it can."""
    child = {(int(p), int(t)): i for i, (p, t) in
             enumerate(zip(tree.parents, tree.token_ids)) if i}
    node, nodes, out = 0, [], []
    while True:
        out.append(int(logits[node].argmax()))
        node = child.get((node, out[-1]))
        if node is None:
            return nodes, out
        nodes.append(node)


def random_batch(seed: int, batch: int = 48, vocab: int = 3):
    rng = random.Random(seed)
    trees = [DraftTree.from_beams(rng.randrange(vocab), random_beams(rng, vocab)) for _ in
             range(batch)]
    packed = pack_trees(trees)
    flat = torch.randn(len(packed.token_ids), vocab, generator=torch.Generator().manual_seed(seed))
    return trees, packed, flat


def check_against_walk(out, trees, packed, flat) -> None:
    for b, tree in enumerate(trees):
        start = packed.query_start_loc[b]
        nodes, tokens = walk_greedy(tree, flat[start:start + tree.num_nodes])
        n = len(nodes)
        assert int(out.num_accepted[b]) == n and int(out.last_node[b]) == (nodes or [0])[-1]
        assert out.accepted_nodes[b, :n].tolist() == nodes and not out.accepted_nodes[b, n:].any()
        assert out.output_token_ids[b, :n + 1].tolist() == tokens
        assert not out.output_token_ids[b, n + 1:].any()


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_brute_force(seed):
    trees, packed, flat = random_batch(seed)
    out = verify_greedy(packed.gather(flat), packed)
    assert out.num_accepted.max() >= 2  # the small vocabulary makes deep acceptance common
    check_against_walk(out, trees, packed, flat)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_on_lists_matches_brute_force_and_tensors(seed):
    trees, packed, flat = random_batch(seed)
    out = rs.verify_greedy_lists(flat.argmax(-1).tolist(), packed)
    check_against_walk(out, trees, packed, flat)
    ref = verify_greedy(packed.gather(flat), packed)
    for f in dataclasses.fields(out):
        assert torch.equal(getattr(out, f.name), getattr(ref, f.name)), f.name


@pytest.mark.parametrize("seed", range(2))
def test_sampling_with_point_mass_targets_is_greedy(seed):
    trees, packed, flat = random_batch(seed)
    onehot = torch.nn.functional.one_hot(flat.argmax(-1), flat.shape[1]).float()
    check_against_walk(verify_sampling(packed.gather(onehot), packed), trees, packed, flat)


def test_greedy_speculation_reproduces_greedy_decoding():
    vocab = 7

    def logits(ctx: list[int]) -> torch.Tensor:  # a toy target: Fibonacci mod 7, period 16
        return -((torch.arange(vocab) - (ctx[-1] + ctx[-2]) % vocab) ** 2).float()

    plain = [1, 1]
    while len(plain) < 60:
        plain.append(int(logits(plain).argmax()))
    proposer, ctx, accepted = NgramProposer(num_speculative_tokens=3), [1, 1], 0
    while len(ctx) < 60:
        tree = DraftTree.from_beams(ctx[-1], proposer.propose([ctx])[0].beams)
        node_logits = torch.stack([logits(ctx + list(tree.path(i)))
                                   for i in range(tree.num_nodes)])
        packed = pack_trees([tree])
        out = verify_greedy(packed.gather(node_logits), packed)
        n = int(out.num_accepted[0])
        ctx += out.output_token_ids[0, :n + 1].tolist()
        accepted += n
    assert ctx[:60] == plain and accepted >= 30


# ---- statistical tests: the emitted tokens must follow the target distribution -----------
V, TRIALS = 5, 20000


def tables(seed: int, depth: int, power: float) -> torch.Tensor:
    """[depth, V, V] next-token distributions given (depth, last token): a Markov target."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(depth, V, V, generator=g) ** power
    return 0.85 * t / t.sum(-1, keepdim=True) + 0.15 / V


def first_two_counts(out, target: torch.Tensor, seed: int) -> torch.Tensor:
    """[V, V] counts of the first two emitted tokens. When the round emitted only one, the
    second is drawn from the target itself, which is what the next round must match if this
    one is lossless: the test then checks a single verification round exactly."""
    t1 = out.output_token_ids[:, 0]
    fill = torch.multinomial(target[1][t1], 1, generator=torch.Generator().manual_seed(seed))
    t2 = torch.where(out.num_accepted >= 1, out.output_token_ids[:, 1], fill.squeeze(1))
    return torch.bincount(t1 * V + t2, minlength=V * V).view(V, V).float()


def chi2_excess(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square statistic over its 1e-6 critical value (Wilson-Hilferty): < 1 passes.
    Anything observed where the target has no mass fails outright."""
    counts, probs = counts.flatten(), probs.flatten()
    support = probs > 0
    if counts[~support].sum() > 0:
        return math.inf
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    k = int(support.sum()) - 1
    critical = k * (1 - 2 / (9 * k) + 4.75 * math.sqrt(2 / (9 * k))) ** 3
    return stat / critical


def check(out, target: torch.Tensor) -> tuple[float, float]:
    """(first-token excess, first-two-tokens excess); the root is token 0 at depth 0."""
    joint = first_two_counts(out, target, seed=1)
    expect = target[0, 0].unsqueeze(1) * target[1]  # [V, V]: p(t1) p(t2 | t1)
    return chi2_excess(joint.sum(1), target[0, 0]), chi2_excess(joint, expect)


def repeat(packed: PackedTrees, n: int) -> PackedTrees:
    """n independent trials of one request's tree (the verifier reads the padded fields)."""
    out = copy.copy(packed)  # the padded tensors are cached attributes: set them on the copy
    for name in ("node_tokens", "node_parents", "node_depths", "node_index", "attn_mask", "unpack", "unpack_valid"):
        t = getattr(packed, name)
        setattr(out, name, t.expand(n, *t.shape[1:]))
    return out


@pytest.fixture(scope="module")
def deterministic_case():
    target = tables(seed=0, depth=4, power=2.0)
    target[0, 0, 3] = 0.0  # top-k/top-p cut a drafted token: it must never be emitted
    target[0, 0] /= target[0, 0].sum()
    tree = DraftTree.from_beams(0, [[1, 2], [1, 3, 4], [2, 0], [3], [1, 2, 1], [4, 4, 4]])
    packed = repeat(pack_trees([tree]), TRIALS)
    return target, packed, target[packed.node_depths, packed.node_tokens]  # [B, N, V]


@pytest.fixture(scope="module")
def sampled_case():
    """Every trial drafts W beams independently from a drafter q unlike the target; the small
    vocabulary makes beams that share a token (or all of it) at a node common."""
    W, L = 4, 2
    target, q = tables(seed=2, depth=L + 1, power=2.0), tables(seed=3, depth=L, power=4.0)
    g = torch.Generator().manual_seed(4)
    x0 = torch.multinomial(q[0, 0], TRIALS * W, replacement=True, generator=g)  # [B * W]
    x1 = torch.multinomial(q[1][x0], 1, generator=g).squeeze(1)
    beams = torch.stack([x0, x1], 1).view(TRIALS, W, L)
    cache: dict[tuple, DraftTree] = {}  # few distinct draws: build each tree once

    def tree(key: tuple) -> DraftTree:
        if key not in cache:
            cache[key] = DraftTree.from_beams(0, key)
        return cache[key]

    trees = [tree(tuple(map(tuple, b))) for b in beams.tolist()]
    packed = pack_trees(trees)
    draft_probs = torch.stack([q[0, 0].expand(TRIALS, W, V), q[1][beams[:, :, 0]]], 2)
    return target, packed, target[packed.node_depths, packed.node_tokens], draft_probs


def test_deterministic_drafts_are_lossless(deterministic_case):
    target, packed, probs = deterministic_case
    torch.manual_seed(0)
    out = verify_sampling(probs, packed)
    assert out.num_accepted.max() == 3 and (out.num_accepted == 0).any()
    assert max(check(out, target)) < 1


def test_sampled_drafts_are_lossless(sampled_case):
    target, packed, probs, q = sampled_case
    torch.manual_seed(0)
    out = verify_sampling(probs, packed, q)
    assert (out.num_accepted == 2).any() and (out.num_accepted == 0).any()
    assert max(check(out, target)) < 1


def merge_duplicate_tries(packed: PackedTrees) -> PackedTrees:
    """The wrong tree rule: try each distinct child once, skipping later beams' repeats."""
    valid = packed.unpack_valid.clone()
    for w in range(1, valid.shape[1]):
        repeat_ = (packed.unpack[:, w:w + 1] == packed.unpack[:, :w]) & packed.unpack_valid[:, :w]
        valid[:, w] &= ~repeat_.any(1)
    out = copy.copy(packed)
    out.unpack_valid = valid
    return out


@pytest.mark.parametrize("wrong", ["accept_if_p_above_q", "no_residual", "merge_duplicates"])
def test_wrong_rules_are_detected(wrong, deterministic_case, sampled_case, monkeypatch):
    """The statistical test has power: each plausible mistake fails it by a wide margin."""
    if wrong == "accept_if_p_above_q":
        monkeypatch.setattr(rs, "_accept", lambda u, px, qx: px >= qx)
    if wrong == "no_residual":  # both paths: sampled drafts, and point masses node by node
        monkeypatch.setattr(rs, "_residual", lambda p, q: p)
        monkeypatch.setattr(rs, "_drop", lambda mass, px: mass)
    torch.manual_seed(0)
    target, packed, probs, q = sampled_case
    if wrong == "merge_duplicates":
        packed = merge_duplicate_tries(packed)
    else:  # point-mass drafts: merging is harmless there (a repeated try is a no-op)
        target_d, packed_d, probs_d = deterministic_case
        assert check(verify_sampling(probs_d, packed_d), target_d)[1] > 3
    assert check(verify_sampling(probs, packed, q), target)[1] > 3


def test_seeded_rows_do_not_depend_on_the_batch():
    small = DraftTree.from_beams(0, [[1]])
    big = DraftTree.from_beams(2, [[1, 2, 3], [0, 1], [4], [3, 3]])
    seeded = DraftTree.from_beams(1, [[2, 0], [3]])
    runs = []
    for trees, row in (([seeded, big], 0), ([small, big, seeded], 2), ([seeded], 0)):
        packed = pack_trees(trees)  # the batches pad beams to different W x L
        outs = []
        for seed in range(20):
            probs = torch.rand(len(trees), packed.node_tokens.shape[1], V).softmax(-1)
            probs[row, :seeded.num_nodes] = torch.linspace(0, 2, V).softmax(-1)
            gens = {row: torch.Generator().manual_seed(seed)}
            out = verify_sampling(probs, packed, generators=gens)
            outs.append(out.output_token_ids[row, :int(out.num_accepted[row]) + 1].tolist())
        runs.append(outs)
    assert runs[0] == runs[1] == runs[2]
    assert len(set(map(tuple, runs[0]))) > 3  # the seeds do matter
