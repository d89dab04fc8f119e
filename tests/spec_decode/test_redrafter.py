"""ReDrafter: the recurrence, beam search against a slow reference, files, the proposer, and
self-distillation end to end on a tiny model whose greedy continuation is predictable."""
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paraserve.spec_decode.proposer import get_proposer
from paraserve.spec_decode.redrafter import (LOOKUP_FIRST_PROB, LOOKUP_NEXT_PROB, DrafterMismatchError,
                                             ReDrafter, ReDrafterConfig, ReDrafterProposer, beam_search,
                                             load_drafter, lookup_path_probs, save_drafter)
from paraserve.spec_decode.tree import DraftTree

V, H = 40, 16


def make_drafter(seed: int = 0, draft_vocab: int = None, project: bool = True, **kw) -> ReDrafter:
    torch.manual_seed(seed)
    config = ReDrafterConfig("base", V, H, project=project, draft_vocab_size=draft_vocab, **kw)
    token_ids = None if draft_vocab is None else torch.randperm(V)[:draft_vocab].sort().values
    drafter = ReDrafter(config, token_ids)
    with torch.no_grad():  # blocks start as the identity; make them do something
        for p in drafter.parameters():
            p.normal_(0, 0.5)
    return drafter.eval()


def make_embed(seed: int = 1) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(V, H).requires_grad_(False)


def test_recurrence_and_teacher_forced_shapes():
    drafter, embed = make_drafter(), make_embed()
    h = torch.randn(5, H)
    tokens = torch.randint(0, V, (5, 3))
    with torch.no_grad():
        logits = drafter(h, tokens, embed)
        assert logits.shape == (5, 3, V)
        silu = F.silu
        s1 = silu(drafter.rnn_w(embed(tokens[:, 0])))  # s_0 = 0: U s_0 vanishes
        s2 = silu(drafter.rnn_w(embed(tokens[:, 1])) + drafter.rnn_u(s1))
        s3 = silu(drafter.rnn_w(embed(tokens[:, 2])) + drafter.rnn_u(s2))
        for k, s in enumerate([s1, s2, s3]):  # h is the same at every step
            x = drafter.proj(torch.cat([h, s], -1))
            for blk in drafter.blocks:
                x = x + silu(blk.linear(x))
            torch.testing.assert_close(logits[:, k], drafter.lm_head(x))


def test_no_projection_head_runs_at_twice_hidden():
    drafter = make_drafter(project=False, num_blocks=1)
    assert drafter.proj is None and drafter.blocks[0].linear.in_features == 2 * H
    with torch.no_grad():
        assert drafter(torch.randn(2, H), torch.zeros(2, 2, dtype=torch.long), make_embed()).shape == (2, 2, V)


def test_fresh_blocks_are_identity():
    block = ReDrafter(ReDrafterConfig("base", V, H)).blocks[0]
    x = torch.randn(3, H)
    torch.testing.assert_close(block(x), x)


def reference_beam_search(drafter, h, last, embed, W, L):
    """One request at a time, beams as Python lists, every candidate enumerated."""
    out_tokens, out_lp = [], []
    for b in range(h.shape[0]):
        beams = [([], [], torch.zeros(1, H), int(last[b]))]  # tokens, logprobs, state, prev
        for _ in range(L):
            cands = []
            for toks, lps, s, prev in beams:  # step 1: a single beam, so only it expands
                s_new = drafter.step(s, embed(torch.tensor([prev])))
                logp = torch.log_softmax(drafter.logits(h[b:b + 1], s_new), -1)[0]
                for r in range(logp.shape[0]):
                    tok = int(drafter.token_ids[r])
                    cands.append((toks + [tok], lps + [float(logp[r])], s_new, tok))
            cands.sort(key=lambda c: -sum(c[1]))
            beams = cands[:W]
        out_tokens.append([c[0] for c in beams])
        out_lp.append([c[1] for c in beams])
    return torch.tensor(out_tokens), torch.tensor(out_lp)


@pytest.mark.parametrize("draft_vocab", [None, 12])
def test_beam_search_matches_reference(draft_vocab):
    drafter, embed = make_drafter(draft_vocab=draft_vocab), make_embed()
    h, last = torch.randn(3, H), torch.randint(0, V, (3,))
    with torch.no_grad():
        ref_tokens, ref_lp = reference_beam_search(drafter, h, last, embed, W=4, L=3)
    beams = beam_search(drafter, h, last, embed, width=4, length=3)
    assert beams.token_ids.shape == (3, 4, 3) and beams.logprobs.shape == (3, 4, 3)
    assert torch.equal(beams.token_ids, ref_tokens)
    torch.testing.assert_close(beams.logprobs, ref_lp, rtol=1e-4, atol=1e-5)
    # visited: the beams after step t are those of a search of length t, padded with -1
    assert beams.visited.shape == (3, 3 * 4, 3) and beams.visited_logprobs.shape == (3, 3 * 4)
    for t in (1, 2, 3):
        with torch.no_grad():
            tok_t, lp_t = reference_beam_search(drafter, h, last, embed, W=4, L=t)
        rows = slice((t - 1) * 4, t * 4)
        assert torch.equal(beams.visited[:, rows, :t], tok_t)
        assert bool((beams.visited[:, rows, t:] == -1).all())
        torch.testing.assert_close(beams.visited_logprobs[:, rows], lp_t.sum(-1), rtol=1e-4, atol=1e-5)


def test_first_step_expands_only_beam_zero_and_beams_are_distinct():
    drafter, embed = make_drafter(), make_embed()
    h, last = torch.randn(2, H), torch.randint(0, V, (2,))
    beams = beam_search(drafter, h, last, embed, width=5, length=1)
    with torch.no_grad():
        s1 = drafter.step(torch.zeros(2, H), embed(last))
        top = torch.log_softmax(drafter.logits(h, s1), -1).topk(5, -1)
    # width distinct first tokens: the top-5 of the one distribution, not 5 copies of its argmax
    assert torch.equal(beams.token_ids[:, :, 0], top.indices)
    deep = beam_search(drafter, h, last, embed, width=5, length=4)
    for b in range(2):
        assert len({tuple(x) for x in deep.token_ids[b].tolist()}) == 5
        score = deep.logprobs[b].sum(-1)
        assert torch.all(score[:-1] >= score[1:])  # beam 0 is the most likely
        tree = DraftTree.from_beams(int(last[b]), deep.token_ids[b].tolist())
        tree.check_integrity()


def test_restricted_vocabulary_never_drafts_outside():
    drafter, embed = make_drafter(draft_vocab=6), make_embed()
    beams = beam_search(drafter, torch.randn(8, H), torch.randint(0, V, (8,)), embed, width=6, length=4)
    kept = set(drafter.token_ids.tolist())
    assert set(beams.token_ids.flatten().tolist()) <= kept
    with pytest.raises(ValueError, match="width"):
        beam_search(drafter, torch.randn(1, H), torch.zeros(1, dtype=torch.long), embed, width=7, length=2)


def test_save_load_round_trip(tmp_path):
    drafter = make_drafter(draft_vocab=12)
    save_drafter(drafter, str(tmp_path), dtype=torch.float32)
    config = json.loads((tmp_path / "redrafter.json").read_text())
    assert config["base_model"] == "base" and config["base_vocab_size"] == V and config["hidden_size"] == H
    loaded = load_drafter(str(tmp_path), "base", V, H)
    assert loaded.config == drafter.config and torch.equal(loaded.token_ids, drafter.token_ids)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    save_drafter(drafter, str(tmp_path / "bf16"))  # the default: bf16 weights, half the file
    small = load_drafter(str(tmp_path / "bf16"))
    assert small.dtype == torch.float32
    torch.testing.assert_close(small.lm_head.weight, drafter.lm_head.weight, rtol=1e-2, atol=1e-2)


def test_wrong_base_model_is_a_clear_error(tmp_path):
    save_drafter(make_drafter(), str(tmp_path))
    with pytest.raises(DrafterMismatchError, match="trained for base model 'base'.*not 'other'"):
        load_drafter(str(tmp_path), "other", V, H)
    with pytest.raises(DrafterMismatchError, match="vocab 41"):
        load_drafter(str(tmp_path), None, V + 1, H)
    load_drafter(str(tmp_path), None, V, H)  # no name to check: the shapes match
    with pytest.raises(ValueError, match="not a ReDrafter drafter"):
        load_drafter(str(tmp_path / "nowhere"))


def fake_base(vocab=V, hidden=H):
    return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab, hidden_size=hidden),
                           embed_tokens=make_embed())


def test_proposer(tmp_path):
    save_drafter(make_drafter(draft_vocab=12), str(tmp_path), dtype=torch.float32)
    proposer = get_proposer("redrafter", model=fake_base(), model_name="base",
                            drafter_path=str(tmp_path), beam_width=3, beam_length=2)
    assert isinstance(proposer, ReDrafterProposer)
    drafts = proposer.propose([[1, 2, 3], [7]], torch.randn(2, H))
    assert len(drafts) == 2
    for d in drafts:
        assert d.draft_probs is None  # deterministic drafts: verification stays lossless
        # every beam either search step held: the 3 final ones (2 tokens) come first, then the
        # first-step beams none of them extends (at most 2: the best one is always extended)
        assert 3 <= len(d.beams) <= 5 and all(len(b) == 2 for b in d.beams[:3])
        assert all(len(b) == 1 for b in d.beams[3:])
    with pytest.raises(DrafterMismatchError):
        ReDrafterProposer(fake_base(vocab=V + 2), "base", str(tmp_path))
    with pytest.raises(ValueError, match="hidden states"):
        proposer.propose([[1]], None)
    with pytest.raises(ValueError, match="no drafter ships"):
        ReDrafterProposer(fake_base(), "no-such-model")


def test_min_draft_prob_cuts_unlikely_tokens_and_stops_the_search(tmp_path):
    """A beam keeps its tokens while the drafter's probability of the prefix is at least
    min_draft_prob (beams left empty are dropped), and the search stops after the step where no
    beam is likely enough any more (it then returns what a search of that length returns);
    0 keeps everything."""
    drafter, embed = make_drafter(draft_vocab=12), make_embed()
    save_drafter(drafter, str(tmp_path), dtype=torch.float32)
    h, last = torch.randn(4, H), torch.randint(0, V, (4,))
    full = beam_search(drafter, h, last, embed, width=3, length=4)
    # the search stops once every beam's log-prob is below the bound
    best = full.logprobs.sum(-1).max(-1).values  # [B] the best 4-token beam of each request
    top = [float(beam_search(drafter, h, last, embed, 3, t).logprobs.sum(-1).max()) for t in (1, 2, 3)]
    checked = 0
    for t in (1, 2, 3):
        short = beam_search(drafter, h, last, embed, width=3, length=t)
        # above every t-token beam, not above every (t-1)-token one: step t runs, step t+1 not
        before = top[t - 2] if t > 1 else 0.0
        if not top[t - 1] < before:  # a probability of 1.0 in float32: no bound separates them
            continue
        checked += 1
        bound = (top[t - 1] + before) / 2
        stopped = beam_search(drafter, h, last, embed, width=3, length=4, min_logprob=bound)
        assert torch.equal(stopped.token_ids, short.token_ids)
        assert torch.equal(stopped.logprobs, short.logprobs)
    assert checked >= 2
    assert beam_search(drafter, h, last, embed, 3, 4, float(best.min()) - 1).token_ids.shape[-1] == 4

    def proposer(p):
        return ReDrafterProposer(fake_base(), "base", str(tmp_path), beam_width=3, beam_length=4,
                                 min_draft_prob=p)

    ids = [[1, int(t)] for t in last]
    for p in (0.0, float(full.logprobs.cumsum(-1)[:, 0, 1].exp().median())):
        # p = the median: some requests keep 2+ tokens of beam 0, some fewer
        got = proposer(p).propose(ids, h)
        with torch.no_grad():
            expect = reference_tree(drafter, h, last, embed, 3, 4, math.log(p) if p else -math.inf)
        for d, nodes in zip(got, expect):
            tree = DraftTree.from_beams(1, d.beams)
            assert {tree.path(i) for i in range(1, tree.num_nodes)} == nodes
            assert tree.num_nodes == len(nodes) + 1  # beams are leaves: no node twice
        if p:
            assert any(len(n) < 12 for n in expect)  # the cut does cut
        else:
            assert all(len(n) > len({b[:k] for b in map(tuple, f) for k in range(1, 5)})
                       for n, f in zip(expect, full.token_ids.tolist()))  # dropped beams add nodes
            for d, f in zip(got, full.token_ids.tolist()):
                assert d.beams[0] == f[0]  # the best final beam first: its nodes are laid out first
    with pytest.raises(ValueError, match="min_draft_prob"):
        proposer(1.0)


def reference_tree(drafter, h, last, embed, W, L, min_logprob, scores=False):
    """Per request, the set of draft paths the proposer should verify: every beam that the
    search of length L holds after some step t (= the beams of a search of length t) whose
    log-prob is at least min_logprob (with scores: a dict path -> log-prob)."""
    out = [{} for _ in range(h.shape[0])]
    for t in range(1, L + 1):
        tokens, lps = reference_beam_search(drafter, h, last, embed, W, t)
        for b in range(h.shape[0]):
            out[b].update({tuple(x): lp for x, lp in zip(tokens[b].tolist(), lps[b].sum(-1).tolist())
                           if lp >= min_logprob})
    return out if scores else [set(d) for d in out]


def best_tree(score: dict, cap: int) -> set:
    """Brute force: of the prefix-closed sets of min(cap, len(score)) paths, the one whose
    scores sum highest (the expected number of accepted drafts)."""
    size = min(cap, len(score))
    best, best_sum = None, -1.0
    for subset in itertools.combinations(score, size):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
            total = sum(score[p] for p in chosen)
            if total > best_sum:
                best, best_sum = chosen, total
    return best


def test_max_nodes_keeps_the_likeliest_tree(tmp_path):
    """With max_nodes, a request's tree holds at most that many nodes: the prefix-closed set
    with the highest sum of acceptance estimates, against a brute force over every such set.
    The drafter's nodes score their probability, the lookup draft's nodes the measured rate for
    its match length, a node both propose the chance that either is right. Requests without a
    bound keep every node."""
    drafter, embed = make_drafter(draft_vocab=12), make_embed()
    save_drafter(drafter, str(tmp_path), dtype=torch.float32)
    lookup = get_proposer("ngram", num_speculative_tokens=4, min_n=1, max_n=2)
    proposer = ReDrafterProposer(fake_base(), "base", str(tmp_path), beam_width=3, beam_length=4,
                                 lookup=lookup)
    h, last = torch.randn(5, H), torch.randint(0, 30, (5,))
    ids = [[int(t), 30, 31, 32, 33, int(t)] for t in last]  # the lookup continues with 30, 31, ...
    # request 3's lookup draft is the drafter's likeliest beam: both propose its nodes
    with torch.no_grad():
        nodes = reference_tree(drafter, h, last, embed, 3, 4, -math.inf, scores=True)
    top = max((p for p in nodes[3] if len(p) == 4), key=nodes[3].get)
    ids[3] = [int(last[3]), *top, int(last[3])]
    caps = [1, 3, 6, 5, 100]
    first, later = LOOKUP_FIRST_PROB[0], LOOKUP_NEXT_PROB[0]  # a one-token match
    for b, (d, cap, ref) in enumerate(zip(proposer.propose(ids, h, max_nodes=caps), caps, nodes)):
        chain = ids[b][1:5]
        score = {p: math.exp(lp) for p, lp in ref.items()}
        for k in range(1, 5):
            q = first * later ** (k - 1)
            score[tuple(chain[:k])] = 1 - (1 - score.get(tuple(chain[:k]), 0.0)) * (1 - q)
        tree = DraftTree.from_beams(1, d.beams)
        got = {tree.path(n) for n in range(1, tree.num_nodes)}
        assert tree.num_nodes - 1 == len(got)  # no node twice
        if cap < 100:
            assert got == best_tree(score, cap)
    assert len(got) == 12 + 4 and len(ref) == 12  # the unbounded request: every node
    # the long match's lookup nodes outscore the one-token match's: they are kept first
    assert lookup_path_probs([1, 2], 5)[(1, 2)] > lookup_path_probs([1, 2], 1)[(1, 2)]
    assert lookup_path_probs([1, 2], 9) == lookup_path_probs([1, 2], 5)


def test_lookup_beam_joins_the_drafter_beams(tmp_path):
    """With a lookup proposer, the prompt-lookup draft of each request (when its context has a
    match) is one more beam after the drafter's, unless a drafter beam is the same tokens."""
    save_drafter(make_drafter(draft_vocab=12), str(tmp_path), dtype=torch.float32)
    lookup = get_proposer("ngram", num_speculative_tokens=3, min_n=1, max_n=2)
    plain = ReDrafterProposer(fake_base(), "base", str(tmp_path), beam_width=2, beam_length=3)
    mixed = ReDrafterProposer(fake_base(), "base", str(tmp_path), beam_width=2, beam_length=3,
                              lookup=lookup)
    ids = [[5, 6, 7, 8, 5, 6], [1, 2, 3], [9, 9]]  # a match, none, a match of the root itself
    h = torch.randn(3, H)
    base = [d.beams for d in plain.propose(ids, h)]
    got = [d.beams for d in mixed.propose(ids, h)]
    assert got[0] == base[0] + [[7, 8, 5]] and got[1] == base[1] and got[2] == base[2] + [[9]]
    # a lookup draft equal to a drafter beam is not verified twice
    first_beam = {tuple(t): b[0] for t, b in zip(ids, base)}
    same = ReDrafterProposer(fake_base(), "base", str(tmp_path), beam_width=2, beam_length=3,
                             lookup=SimpleNamespace(match=lambda t: (first_beam[tuple(t)], 2)))
    assert [d.beams for d in same.propose(ids, h)] == base


# ---- self-distillation end to end ----------------------------------------------------------

def build_predictable_llama(path: Path) -> Path:
    """A tiny Llama whose greedy next token is perm[current token]: attention and MLP outputs
    are zero, so the final hidden state is the normalised embedding of the current token, and
    LM-head row perm[x] is x's embedding (rows of equal norm: the dot product peaks there).
    EOS is a fixed point, so answers never end early."""
    from transformers import LlamaForCausalLM

    from tiny_models import COMMON, _configs, build_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(_configs()["llama"])
    V_ = COMMON["vocab_size"]
    eos = COMMON["eos_token_id"]
    others = torch.tensor([t for t in range(V_) if t != eos])
    perm = torch.arange(V_)
    perm[others] = others[torch.randperm(len(others))]
    with torch.no_grad():
        emb = F.normalize(torch.randn(V_, COMMON["hidden_size"]), dim=-1) * 8
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight[perm] = emb
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def test_train_drafter_cli_end_to_end(tmp_path, monkeypatch):
    from paraserve.server.cli import main
    from paraserve.spec_decode import train_drafter

    base = build_predictable_llama(tmp_path / "base")
    out, data = tmp_path / "drafter", tmp_path / "data"
    args = ["train-drafter", "--model", str(base), "--out", str(out), "--dtype", "float32", "--threads", "1",
            "--num-prompts", "40", "--num-heldout", "6", "--max-tokens", "24", "--epochs", "4",
            "--batch-size", "64", "--lr", "3e-3", "--draft-vocab-size", "256", "--beam-width", "2",
            "--beam-length", "3", "--num-samples", "1", "--generated-prompts", "0", "--temperature", "0.8",
            "--soft-targets", "4", "--data-dir", str(data)]
    threads = torch.get_num_threads()

    def train(*extra, to=out):  # the last --out given wins
        try:  # one thread: OpenMP on a busy 2-core machine is many times slower with two
            assert main(args + list(extra) + ["--out", str(to)]) == 0
        finally:
            torch.set_num_threads(threads)
        return json.loads((to / "train_report.json").read_text())["report"]

    train()
    kept = sorted(p.name for p in data.iterdir())
    assert len(kept) == 2 and kept[0].endswith(".json") and kept[1].endswith(".pt")
    made = json.loads((out / "train_report.json").read_text())
    # the same data options again: the kept data, nothing generated (other training options)
    real, hidden = train_drafter.generate_samples, train_drafter.add_hidden_states
    monkeypatch.setattr(train_drafter, "generate_samples", lambda *a: pytest.fail("generated again"))
    monkeypatch.setattr(train_drafter, "add_hidden_states", lambda *a: pytest.fail("hidden again"))
    again = train("--epochs", "1", "--lr", "1e-3", to=tmp_path / "again")
    assert again["num_train_positions"] == made["report"]["num_train_positions"]
    assert "generate" not in again["seconds"] and again["accepted_length"] > 1.0
    # other data options: new data, kept beside the first; a run stopped in the hidden-state
    # pass leaves its answers, and the next one resumes from them
    monkeypatch.setattr(train_drafter, "generate_samples", real)

    def stop(*a):
        raise KeyboardInterrupt

    # first a run stopped while answering: it keeps its finished chunks of requests, and the
    # next run answers only the rest (40 greedy + 6 held-out + 40 sampled = 86 requests)
    from paraserve.llm import LLM

    monkeypatch.setattr(train_drafter, "GENERATE_CHUNK", 16)
    real_generate, calls, stop_at = LLM.generate, [], [3]

    def generate(self, requests, *a, **k):
        calls.append(len(requests))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real_generate(self, requests, *a, **k)

    monkeypatch.setattr(LLM, "generate", generate)
    short_args = args + ["--max-tokens", "12", "--epochs", "1", "--out", str(tmp_path / "short")]
    try:  # Ctrl-C: the CLI exits 130
        assert main(short_args) == 130
        assert len(list(data.glob("*.progress.pt"))) == 1 and not list(data.glob("*.samples.pt"))
        calls.clear()
        stop_at[0] = None
        monkeypatch.setattr(train_drafter, "add_hidden_states", stop)
        assert main(short_args) == 130  # stopped in the hidden-state pass this time
    finally:
        torch.set_num_threads(threads)
    assert calls == [16, 16, 16, 6]  # the 32 kept answers were not asked again
    assert len(list(data.glob("*.samples.pt"))) == 1 and len(list(data.glob("*.pt"))) == 2
    assert not list(data.glob("*.progress.pt"))
    monkeypatch.setattr(train_drafter, "generate_samples", lambda *a: pytest.fail("generated again"))
    monkeypatch.setattr(train_drafter, "add_hidden_states", hidden)
    short = train("--max-tokens", "12", "--epochs", "1", to=tmp_path / "short")
    assert short["num_train_positions"] < again["num_train_positions"]
    assert not list(data.glob("*.samples.pt")) and len(list(data.glob("*.pt"))) == 2
    report = made["report"]
    assert made["train"]["num_samples"] == 1 and made["train"]["soft_targets"] == 4
    # a greedy and a sampled answer of up to 24 tokens per prompt (this model rarely ends early)
    assert 40 * 23 < report["num_train_positions"] <= 2 * 40 * 23, report
    # without training a drafter accepts ~1 (only the bonus token); this pattern is learnable
    print(report)
    assert report["accepted_length"] > 1.5, report
    drafter = load_drafter(str(out), "base", 384, 64)
    assert drafter.config.draft_vocab_size == 256
    with pytest.raises(DrafterMismatchError):
        load_drafter(str(out), "SmolLM2-135M-Instruct", 49152, 576)
    # --init-from goes on from a drafter: its layers and vocabulary, whatever the new-drafter
    # flags say (at a vanishing learning rate the weights stay where they were)
    went_on = train("--init-from", str(out), "--epochs", "1", "--lr", "1e-12", "--num-blocks", "1",
                    "--draft-vocab-size", "100", to=tmp_path / "went_on")
    after = load_drafter(str(tmp_path / "went_on"), "base", 384, 64)
    assert after.config == drafter.config and torch.equal(after.token_ids, drafter.token_ids)
    for (name, a), (_, b) in zip(after.state_dict().items(), drafter.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3), name
    assert went_on["accepted_length"] == pytest.approx(report["accepted_length"], abs=0.05)
    # what it started from, measured on the same held-out answers (the same data dir)
    assert went_on["start_accepted_length"] == pytest.approx(report["accepted_length"], abs=0.05)
    assert report["start_accepted_length"] is None
    written = json.loads((tmp_path / "went_on" / "train_report.json").read_text())
    assert written["train"]["num_blocks"] == 1 and written["drafter"]["num_blocks"] == drafter.config.num_blocks
    # --average-with-start 0.5: halfway between the start and what the same training gives alone
    train("--init-from", str(out), "--epochs", "1", "--lr", "3e-3", to=tmp_path / "trained")
    train("--init-from", str(out), "--epochs", "1", "--lr", "3e-3", "--average-with-start", "0.5",
          to=tmp_path / "averaged")
    trained = load_drafter(str(tmp_path / "trained"), "base", 384, 64)
    averaged = load_drafter(str(tmp_path / "averaged"), "base", 384, 64)
    assert not torch.allclose(trained.lm_head.weight.float(), drafter.lm_head.weight.float(), atol=1e-2)
    for name, a in averaged.state_dict().items():
        if a.is_floating_point():
            mid = (drafter.state_dict()[name].float() + trained.state_dict()[name].float()) / 2
            assert torch.allclose(a.float(), mid, atol=1e-2, rtol=1e-2), name


def test_init_from_warns_when_the_heldout_prompts_differ(tmp_path):
    """--init-from with another --train-seed (or prompts file, or held-out count) than the
    starting drafter's run holds out prompts it was trained on: a warning says its figures favour it."""
    import dataclasses
    import logging

    from paraserve.spec_decode import train_drafter as td
    from paraserve.spec_decode.redrafter import shipped_drafter_path

    records = []
    handler = logging.Handler()
    handler.emit = records.append  # not caplog: the engine's log setup stops "paraserve" propagating
    td.logger.addHandler(handler)
    try:
        cfg = td.TrainDrafterConfig(out=str(tmp_path / "out"))
        shipped = shipped_drafter_path("SmolLM2-135M-Instruct")  # its last run: seed 2, default prompts
        td._warn_if_heldout_differs(shipped, dataclasses.replace(cfg, train_seed=2))
        td._warn_if_heldout_differs(str(tmp_path), dataclasses.replace(cfg, train_seed=1))  # no report
        assert not records
        (tmp_path / td.REPORT_FILE).write_text(json.dumps({"train": dataclasses.asdict(cfg)}))
        td._warn_if_heldout_differs(str(tmp_path), dataclasses.replace(cfg, train_seed=1, num_heldout=8))
    finally:
        td.logger.removeHandler(handler)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "--train-seed 0 -> 1" in message and "--num-heldout 32 -> 8" in message
    assert "--prompts-file None" not in message


def test_train_drafter_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    from paraserve.server.cli import main

    base = tiny_model_dir("llama")
    capsys.readouterr()
    bad = tmp_path / "prompts.txt"
    bad.write_text("only one\n")
    assert main(["train-drafter", "--model", str(base), "--out", str(tmp_path / "d"),
                 "--prompts-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "has 1 prompts" in err and "Traceback" not in err
    (tmp_path / "file").write_text("")
    assert main(["train-drafter", "--model", str(base), "--out", str(tmp_path / "file")]) == 2
    assert "cannot create --out directory" in capsys.readouterr().err
    out = ["train-drafter", "--model", str(base), "--out", str(tmp_path / "d"), "--generated-prompts", "0"]
    assert main(out + ["--init-from", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from" in err and "is not a directory" in err
    save_drafter(make_drafter(), str(tmp_path / "other"))  # hidden H, not the tiny model's 64
    assert main(out + ["--init-from", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from" in err and "trained for base model" in err, err
    assert main(out + ["--init-from", "shipped"]) == 2  # none ships for this model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no drafter ships" in err, err


# ---- training set and losses -----------------------------------------------------------------

def test_training_set_targets_base_argmax_on_greedy_path_within_samples():
    """Targets are the base model's argmax (for a sampled answer not the sampled token), offsets
    after an input the base model would not have chosen greedily are masked, and no offset reads
    across into the next sample."""
    from paraserve.spec_decode.train_drafter import (Sample, Teacher, TrainDrafterConfig,
                                                     make_training_set)

    a = Sample([1, 20, 21, 22, 23, 24], prompt_len=2)  # rows 0-5
    b = Sample([1, 30, 31, 32], prompt_len=1)  # rows 6-9
    # the base argmax at each row: a follows it except at row 2 (it said 25, the sample has 22)
    arg_a = torch.tensor([20, 21, 25, 23, 24, 2])
    arg_b = torch.tensor([30, 31, 32, 2])
    teach = [Teacher(torch.stack([x, (x + 1) % V], 1), torch.tensor([[0.7, 0.2]] * len(x)))
             for x in (arg_a, arg_b)]
    vocab = torch.tensor([2, 20, 21, 22, 23, 24, 25, 30, 31, 32])  # drafter row i -> base id
    row = {int(t): i for i, t in enumerate(vocab)}
    hidden = [torch.randn(6, H), torch.randn(4, H)]
    cfg = TrainDrafterConfig(out="unused", soft_targets=2, beam_length=3)
    data = make_training_set([a, b], hidden, teach, vocab, 40, cfg)
    assert data.positions.tolist() == [1, 2, 3, 6, 7]  # last prompt token .. third-to-last row
    h, g, y, valid, sr, sp, target_h = data.batch(torch.arange(5), 3, greedy_path=True)
    assert torch.equal(h, torch.cat(hidden)[[1, 2, 3, 6, 7]])
    assert g[0].tolist() == [21, 22, 23] and g[3].tolist() == [30, 31, 32]
    assert torch.equal(target_h[0], torch.cat(hidden)[[2, 3, 4]])  # the rows whose choice is learnt
    # position 1 (g_0 = 21): row 2's argmax 25 is the target, not the sampled 22 ...
    assert y[0, 0] == row[25] and valid[0].tolist() == [True, False, False]  # ... and 22 left the path
    assert valid[1].tolist() == [False, False, False]  # g_0 = 22 itself is off the path
    assert y[2].tolist() == [row[24], -100, -100] and valid[2].tolist() == [True, False, False]
    # sample b: its last row has no next token to learn, and nothing reads into sample a
    assert valid[3].tolist() == [True, True, False] and y[3, :2].tolist() == [row[31], row[32]]
    assert valid[4].tolist() == [True, False, False]
    # soft targets: top-2 as drafter rows (-1: not drafted), probabilities renormalised over them
    assert sr[0, 0].tolist() == [row[25], -1] and sp[0, 0].tolist() == [1.0, 0.0]
    assert sr[2, 0].tolist() == [row[24], row[25]]
    torch.testing.assert_close(sp[2, 0], torch.tensor([0.7, 0.2]) / 0.9, atol=1e-3, rtol=0)  # stored as fp16
    loose = data.batch(torch.arange(5), 3, greedy_path=False).valid
    assert loose[0].tolist() == [True, True, True] and loose[3].tolist() == [True, True, False]


@pytest.mark.parametrize("soft", [0, 2])
def test_soft_targets_teach_the_runner_up(soft):
    """The base model's choice is 5 (p 0.55) with 9 a close second (0.45): hard labels drive 9's
    probability to zero, soft targets teach the drafter the runner-up its second beam needs."""
    from paraserve.spec_decode.train_drafter import (Sample, Teacher, TrainDrafterConfig, fit,
                                                     make_training_set)

    torch.manual_seed(0)
    samples = [Sample([1] + torch.randint(3, V, (7,)).tolist(), prompt_len=2) for _ in range(16)]
    teach = [Teacher(torch.tensor([[5, 9, 3]] * 8), torch.tensor([[0.55, 0.45, 0.0]] * 8)) for _ in samples]
    hidden = [torch.randn(8, H) for _ in samples]
    cfg = TrainDrafterConfig(out="unused", soft_targets=soft, soft_weight=1.0 if soft else 0.5,
                             greedy_path=False, beam_length=2, epochs=40, batch_size=32, lr=1e-2, bf16=False)
    drafter = ReDrafter(ReDrafterConfig("base", V, H))
    embed = make_embed()
    data = make_training_set(samples, hidden, teach, torch.arange(V), V, cfg)
    fit(drafter, data, embed, cfg)
    h, g, _, valid, _, _, _ = data.batch(torch.arange(data.num_positions), 2, greedy_path=False)
    with torch.no_grad():
        p = torch.softmax(drafter(h, g, embed), -1)[valid].mean(0)
    if soft:
        assert p.topk(2).indices.tolist() == [5, 9]
        assert abs(p[9] - 0.45) < 0.1, p[[5, 9]]
    else:
        assert p[5] > 0.9 and p[9] < 0.05, p[[5, 9]]


def test_speculative_config_wires_the_lookup_beam(tmp_path):
    from paraserve.config import SpecConfig
    from paraserve.spec_decode.ngram import NgramProposer
    from paraserve.spec_decode.speculator import build_proposer

    save_drafter(make_drafter(draft_vocab=12), str(tmp_path), dtype=torch.float32)
    on = build_proposer(SpecConfig(method="redrafter", drafter_path=str(tmp_path), beam_length=3,
                                   prompt_lookup_max=2), fake_base(), "base")
    # the lookup beam proposes lookup_length tokens (default 8), longer than the drafter's beams
    assert isinstance(on.lookup, NgramProposer) and (on.lookup.k, on.lookup.min_n, on.lookup.max_n) == (8, 2, 2)
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 5, 6]]
    assert [7, 8, 9, 10, 11, 12, 13, 14] in on.propose(ids, torch.randn(1, H))[0].beams
    short = build_proposer(SpecConfig(method="redrafter", drafter_path=str(tmp_path), lookup_length=2),
                           fake_base(), "base")
    assert short.lookup.k == 2 and [7, 8] in short.propose(ids, torch.randn(1, H))[0].beams
    off = build_proposer(SpecConfig(method="redrafter", drafter_path=str(tmp_path), lookup_beam=False),
                         fake_base(), "base")
    assert off.lookup is None


def float_beam_search(drafter, h, last, embed, W, L, min_logprob):
    """Reference for the compiled search: every candidate enumerated, log_softmax in float32,
    ties to the earlier (beam, row); the search stops once every request's beams are below
    min_logprob -> visited tokens and log-probs as in Beams (-1 padded)."""
    B = h.shape[0]
    beams = [[([], torch.zeros(()), torch.zeros(1, h.shape[1], dtype=h.dtype), int(last[b]))] for b in range(B)]
    steps = []
    for t in range(L):
        if t and max(float(c[1]) for req in beams for c in req) < min_logprob:
            break
        for b in range(B):
            cands = []
            for toks, score, s, prev in beams[b]:  # step 1: a single beam, so only it expands
                s_new = drafter.step(s, embed(torch.tensor([prev])))
                logp = torch.log_softmax(drafter.logits(h[b:b + 1], s_new).float(), -1)[0]
                for r in range(logp.shape[0]):
                    tok = int(drafter.token_ids[r])
                    cands.append((toks + [tok], score + logp[r], s_new, tok))
            cands.sort(key=lambda c: -float(c[1]))  # stable: ties keep enumeration order
            beams[b] = cands[:W]
        steps.append([list(req) for req in beams])
    n = len(steps)
    visited = [[c[0] + [-1] * (n - len(c[0])) for step in steps for c in step[b]] for b in range(B)]
    visited_lp = [[float(c[1]) for step in steps for c in step[b]] for b in range(B)]
    return torch.tensor(visited), torch.tensor(visited_lp)


@pytest.mark.parametrize("hidden, draft_vocab, project, min_logprob", [
    (64, None, True, float("-inf")),  # AMX-packed layers where the CPU has AMX
    (64, 96, False, -1.0),  # a restricted vocabulary; the search stops early
    (40, 50, True, float("-inf")),  # the small-M kernel
])
def test_compiled_beam_search_matches_a_reference(hidden, draft_vocab, project, min_logprob):
    """The engine's bf16 drafter searches in one compiled call (draft_head.cpp): the same visited
    beams and log-probs (to float rounding) as enumerating every candidate in torch."""
    from paraserve.ops import cpu
    from paraserve.spec_decode.redrafter import Beams, compiled_head

    if cpu.kernels() is None:
        pytest.skip("no CPU kernels here")
    torch.manual_seed(0)
    vocab = 128
    config = ReDrafterConfig("base", vocab, hidden, project=project, draft_vocab_size=draft_vocab)
    token_ids = None if draft_vocab is None else torch.randperm(vocab)[:draft_vocab].sort().values
    drafter = ReDrafter(config, token_ids)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.15)
    drafter = drafter.to(torch.bfloat16).eval().requires_grad_(False).pack()
    embed = nn.Embedding(vocab, hidden).to(torch.bfloat16).requires_grad_(False)
    head = compiled_head(drafter, embed)
    assert head is not None
    float32 = ReDrafter(config, token_ids)
    assert compiled_head(float32, nn.Embedding(vocab, hidden)) is None  # float32: the torch search
    h, last = torch.randn(5, hidden).bfloat16(), torch.randint(0, vocab, (5,))
    got = Beams(*head.beam_search(h, last, 4, 4, min_logprob))
    with torch.no_grad():
        visited, visited_lp = float_beam_search(drafter, h, last, embed, 4, 4, min_logprob)
    assert torch.equal(got.visited, visited)
    torch.testing.assert_close(got.visited_logprobs, visited_lp, rtol=1e-4, atol=1e-4)
    n = visited.shape[-1]
    assert torch.equal(got.token_ids, visited[:, -4:])  # the final beams
    torch.testing.assert_close(got.logprobs.sum(-1), visited_lp[:, -4:], rtol=1e-4, atol=1e-4)
    assert (n < 4) == (min_logprob > float("-inf"))  # the early stop was exercised


def test_int8_drafter_layers_search_as_a_reference_on_the_int8_kernel(monkeypatch):
    """drafter_int8: the compiled search with its layers on int8_linear visits the beams the
    torch search visits when every DraftLinear runs that kernel (the kernel itself is checked in
    tests/layers/test_cpu_kernels.py); asking for it where it cannot run is a clear error."""
    from paraserve.ops import cpu
    from paraserve.spec_decode import redrafter
    from paraserve.spec_decode.redrafter import Beams, DraftLinear, compiled_head

    if cpu.kernels() is None:
        pytest.skip("no CPU kernels here")
    torch.manual_seed(1)
    vocab, hidden = 128, 64
    drafter = ReDrafter(ReDrafterConfig("base", vocab, hidden, draft_vocab_size=96),
                        torch.randperm(vocab)[:96].sort().values)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.15)
    drafter = drafter.to(torch.bfloat16).eval().requires_grad_(False).pack()
    embed = nn.Embedding(vocab, hidden).to(torch.bfloat16).requires_grad_(False)
    base = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab, hidden_size=hidden), embed_tokens=embed)
    default = ReDrafterProposer(base, "base", drafter=drafter, int8=None)  # as SpecConfig leaves it
    assert default.int8 == cpu.int8_available()  # on wherever AMX tiles or VNNI run
    with monkeypatch.context() as m:  # a CPU with neither AMX nor VNNI
        m.setattr(cpu, "int8_available", lambda: False)
        m.setattr(cpu, "amx_available", lambda: False)
        assert compiled_head(drafter, embed, None) is not None  # the default falls back to bf16
        with pytest.raises(ValueError, match="AMX tiles or AVX-512 VNNI"):
            compiled_head(drafter, embed, True)
    if not cpu.int8_available():
        return
    head = compiled_head(drafter, embed, True)
    k = cpu.kernels()
    int8 = {id(m): k.amx_pack_int8(m.weight) for m in drafter.modules() if isinstance(m, DraftLinear)}
    monkeypatch.setattr(DraftLinear, "forward",
                        lambda self, x: k.int8_linear(x.to(torch.bfloat16).contiguous(), *int8[id(self)], self.bias))
    h, last = torch.randn(5, hidden).bfloat16(), torch.randint(0, vocab, (5,))
    got = Beams(*head.beam_search(h, last, 4, 4, float("-inf")))
    with torch.no_grad():
        visited, visited_lp = float_beam_search(drafter, h, last, embed, 4, 4, float("-inf"))
    assert torch.equal(got.visited, visited)
    torch.testing.assert_close(got.visited_logprobs, visited_lp, rtol=1e-4, atol=1e-4)
    bf16 = Beams(*compiled_head(drafter, embed, False).beam_search(h, last, 4, 4, float("-inf")))
    assert not torch.equal(bf16.visited_logprobs, got.visited_logprobs)  # int8 really ran
    with pytest.raises(ValueError, match="multiples of 64"):
        odd = ReDrafter(ReDrafterConfig("base", vocab, 40)).to(torch.bfloat16).eval().pack()
        compiled_head(odd, nn.Embedding(vocab, 40).to(torch.bfloat16), True)
    assert redrafter.int8_applies(drafter)


def test_average_with_start_blends_every_weight_and_needs_a_start():
    """--average-with-start a: the saved drafter is a * start + (1 - a) * trained, weight by weight
    (the drafted token ids stay); without --init-from, or outside [0, 1), a clear error."""
    from paraserve.config import ConfigError
    from paraserve.spec_decode.train_drafter import TrainDrafterConfig, average_weights

    start, trained = make_drafter(seed=0, draft_vocab=24), make_drafter(seed=1, draft_vocab=24)
    trained.token_ids.copy_(start.token_ids)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    average_weights(trained, {k: v.clone() for k, v in start.state_dict().items()}, 0.25)
    for k, v in trained.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.25 * start.state_dict()[k] + 0.75 * before[k])
        else:
            assert torch.equal(v, before[k])
    assert not torch.equal(trained.lm_head.weight, before["lm_head.weight"])
    TrainDrafterConfig(out="x", init_from="shipped", average_with_start=0.5)
    with pytest.raises(ConfigError, match="needs --init-from"):
        TrainDrafterConfig(out="x", average_with_start=0.5)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        TrainDrafterConfig(out="x", init_from="shipped", average_with_start=1.0)
