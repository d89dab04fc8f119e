"""Sampler: greedy exactness, seeded reproducibility, truncation, distribution (chi-square),
penalties against hand-written/transformers references, logprobs, and no host sync."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from paraserve.layers.sampler import (Sampler, SamplingMetadata, SamplingRow, process_logits,
                                      top_logprobs)
from paraserve.sampling_params import SamplingParams

CPU = torch.device("cpu")


def seeded(seed: int, device: torch.device = CPU) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def row(params: SamplingParams, prompt: Optional[list[int]] = None,
        output: Optional[list[int]] = None, device: torch.device = CPU) -> SamplingRow:
    gen = seeded(params.seed, device) if params.seed is not None else None
    return SamplingRow(params, list(prompt or [0]), list(output or []), gen)


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return Sampler()(logits, SamplingMetadata.build(rows, logits.shape[1], CPU))


def chi2_critical(dof: int, p: float = 1e-3) -> float:
    """Upper-p chi-square quantile by Wilson-Hilferty (slightly generous for small dof)."""
    z = torch.special.ndtri(torch.tensor(1.0 - p, dtype=torch.float64)).item()
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(samples: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the support of expected_probs; fails on any off-support draw."""
    counts = torch.bincount(samples, minlength=expected_probs.numel()).double()
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "sampled a token with zero probability"
    expected = expected_probs.double()[support] * samples.numel()
    assert expected.min() >= 5, "test setup: too few expected draws per bin"
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


def truncated(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Reference: keep the top-k, then the smallest prefix (by prob) with mass >= top_p."""
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    k = top_k if top_k > 0 else probs.numel()
    kept = probs[order[:k]] / probs[order[:k]].sum()
    n = int((kept.cumsum(0) < top_p).sum()) + 1  # first index where the mass reaches top_p
    keep[order[:min(n, k)]] = True
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


# ---- greedy -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(6, 50).to(dtype)
    meta = SamplingMetadata.build([row(SamplingParams(temperature=0.0))] * 6, 50, CPU)
    assert meta.all_greedy and meta.no_logit_processing
    out = Sampler()(logits, meta)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_mixed_batch_keeps_greedy_rows_exact():
    torch.manual_seed(0)
    logits = torch.randn(8, 64) * 0.5  # flat enough that random rows rarely hit the argmax
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else
              SamplingParams(temperature=1.0, top_k=20, top_p=0.95, min_p=0.01, seed=i)
              for i in range(8)]
    rows = [row(p) for p in params]
    random_hits_argmax = []
    for _ in range(10):
        out = sample(logits, rows).sampled_token_ids
        assert torch.equal(out[0::2], logits.argmax(-1)[0::2])
        random_hits_argmax.append(torch.equal(out[1::2], logits.argmax(-1)[1::2]))
    assert not all(random_hits_argmax)


# ---- seeded reproducibility ---------------------------------------------------------------

def _run_seeded(step_logits: list[torch.Tensor], seed: int, position: int, batch: int) -> list[int]:
    """Tokens of one seeded request at `position` in a batch of unrelated rows."""
    target = row(SamplingParams(temperature=0.9, top_p=0.9, seed=seed))
    others = [row(SamplingParams(temperature=1.3, seed=1000 + j if j % 2 else None))
              for j in range(batch - 1)]
    tokens = []
    for logits in step_logits:
        rows = others[:position] + [target] + others[position:]
        batch_logits = torch.randn(batch, logits.numel())
        batch_logits[position] = logits
        tokens.append(int(sample(batch_logits, rows).sampled_token_ids[position]))
        target.output_token_ids.append(tokens[-1])
    return tokens


def test_seed_reproducible_independent_of_batch():
    torch.manual_seed(0)
    step_logits = [torch.randn(500) * 0.3 for _ in range(6)]
    alone = _run_seeded(step_logits, seed=42, position=0, batch=1)
    torch.manual_seed(123)  # the global RNG (unseeded rows) must not matter
    assert _run_seeded(step_logits, seed=42, position=3, batch=5) == alone
    assert _run_seeded(step_logits, seed=42, position=1, batch=9) == alone
    assert _run_seeded(step_logits, seed=43, position=0, batch=1) != alone


# ---- truncation ---------------------------------------------------------------------------

def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    return sample(logits.expand(n, -1), [row(params)] * n).sampled_token_ids


def test_truncation_never_emits_excluded_tokens():
    torch.manual_seed(0)
    logits = torch.randn(32) * 2
    temp = 1.3
    probs = (logits / temp).softmax(-1)
    allowed_k = set(logits.topk(5).indices.tolist())
    nucleus = truncated(probs, top_p=0.6) > 0
    allowed_p = set(nucleus.nonzero().flatten().tolist())
    allowed_min_p = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    assert 1 < len(allowed_p) < 32 and 1 < len(allowed_min_p) < 32

    got_k = set(_draws(logits, SamplingParams(temperature=temp, top_k=5)).tolist())
    got_p = set(_draws(logits, SamplingParams(temperature=temp, top_p=0.6)).tolist())
    got_min = set(_draws(logits, SamplingParams(temperature=temp, min_p=0.2)).tolist())
    both = SamplingParams(temperature=temp, top_k=5, top_p=0.6, min_p=0.2)
    got_all = set(_draws(logits, both).tolist())
    # subsets, and (with 4000 draws) every allowed token shows up: truncation is not too tight
    assert got_k == allowed_k
    assert got_p == allowed_p
    assert got_min == allowed_min_p
    assert got_all <= allowed_k & allowed_p & allowed_min_p


# top_p=1e-9 rounds 1 - top_p to 1.0 in float32: only the keep-the-top-token rule saves it
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_p=1e-6),
                                    SamplingParams(temperature=1.5, top_p=1e-9),
                                    SamplingParams(temperature=1.5, top_k=1),
                                    SamplingParams(temperature=1.5, min_p=1.0)])
def test_truncation_edge_cases_are_argmax(params):
    torch.manual_seed(0)
    logits = torch.randn(16, 100)
    rows = [row(params) for _ in range(16)]
    assert torch.equal(sample(logits, rows).sampled_token_ids, logits.argmax(-1))


# ---- distribution -------------------------------------------------------------------------

LOGITS8 = torch.tensor([1.0, 0.2, -0.5, 0.8, -1.0, 0.0, 0.5, -0.2])


# supports of 8, 4, 5 and 3 tokens (top_p applies to the renormalised top-k set)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.85), (5, 0.75)])
def test_chi_square_matches_truncated_softmax(top_k, top_p):
    torch.manual_seed(1234)
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    draws = _draws(LOGITS8, params, n=20000)
    expected = truncated((LOGITS8 / 0.7).softmax(-1), top_k, top_p)
    stat, dof = chi2_stat(draws, expected)
    assert stat < chi2_critical(dof), (stat, dof)


def test_chi_square_per_request_generators():
    """The seeded path (one generator per row, V draws each) has the right distribution too."""
    rows = [row(SamplingParams(temperature=0.7, seed=s)) for s in range(500)]
    logits = LOGITS8.expand(500, -1)
    draws = torch.cat([sample(logits, rows).sampled_token_ids for _ in range(20)])
    stat, dof = chi2_stat(draws, (LOGITS8 / 0.7).softmax(-1))
    assert stat < chi2_critical(dof), (stat, dof)


def test_chi_square_has_power():
    """Guards the test itself: temperature 0.7 draws must be rejected as temperature 1.0."""
    torch.manual_seed(1234)
    draws = _draws(LOGITS8, SamplingParams(temperature=0.7), n=20000)
    stat, dof = chi2_stat(draws, LOGITS8.softmax(-1))
    assert stat > chi2_critical(dof)


# ---- penalties, bias, min_tokens ------------------------------------------------------------

def _reference_processed(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """bias -> min_tokens -> repetition (transformers) -> presence/frequency (OpenAI)."""
    p, x = r.params, logits.clone().unsqueeze(0)
    for tok, b in (p.logit_bias or {}).items():
        if tok < x.shape[1]:  # out-of-vocab bias is ignored, not an error for the batch
            x[0, tok] += b
    if len(r.output_token_ids) < p.min_tokens:
        blocked = p.stop_token_ids + ([] if p.eos_token_id is None else [p.eos_token_id])
        x[0, blocked] = float("-inf")
    ids = torch.tensor([r.prompt_token_ids + r.output_token_ids])
    x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)[0]
    for tok in set(r.output_token_ids):
        c = r.output_token_ids.count(tok)
        x[tok] -= c * p.frequency_penalty + p.presence_penalty
    return x


def test_penalties_bias_min_tokens_match_reference():
    torch.manual_seed(0)
    vocab = 40
    logits = torch.randn(4, vocab) * 3
    rows = [
        row(SamplingParams(repetition_penalty=1.3), [1, 2, 3, 3], [4, 5, 5]),
        row(SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4), [6, 7], [7, 8, 8, 8, 9]),
        row(SamplingParams(repetition_penalty=0.8, frequency_penalty=1.5, presence_penalty=1.0,
                           logit_bias={3: 2.5, 10: -4.0, 999: 1.0}), [3, 10, 11], [11, 12, 12]),
        row(SamplingParams(min_tokens=5, stop_token_ids=[20, 21], eos_token_id=2,
                           repetition_penalty=1.1), [2, 20], [2, 22]),
    ]
    meta = SamplingMetadata.build(rows, vocab, CPU)
    got = process_logits(logits.clone(), meta)
    want = torch.stack([_reference_processed(logits[i], r) for i, r in enumerate(rows)])
    torch.testing.assert_close(got, want)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert sample(logits, [row(params, [5], [0])]).sampled_token_ids.tolist() == [1]
    # negative logits are multiplied, so a seen negative token falls further behind
    logits = torch.tensor([[-1.0, -1.1, -5.0, -6.0]])
    assert sample(logits, [row(params, [0], [])]).sampled_token_ids.tolist() == [1]


def test_logit_bias_steers_greedy_and_random():
    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    rows = [row(SamplingParams(temperature=0.0, logit_bias={7: 100.0})),
            row(SamplingParams(temperature=1.0, logit_bias={9: 100.0}, seed=3))]
    assert sample(logits, rows).sampled_token_ids.tolist() == [7, 9]


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    eos, stops = 0, [1, 2]
    logits = torch.tensor([[10.0, 9.0, 8.0, 7.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=stops, eos_token_id=eos)
    for n_out, want in [(0, 3), (2, 3), (3, 0), (5, 0)]:
        out = sample(logits, [row(params, [4], [4] * n_out)]).sampled_token_ids.tolist()
        assert out == [want], n_out
    no_eos = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[0])
    assert sample(logits, [row(no_eos, [4], [])]).sampled_token_ids.tolist() == [1]
    random = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=stops, eos_token_id=eos)
    draws = sample(logits.expand(500, -1), [row(random)] * 500).sampled_token_ids
    assert set(draws.tolist()) <= {3, 4}


# ---- logprobs -----------------------------------------------------------------------------

def test_sample_logprobs_are_raw_and_ranked():
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(5, vocab) * 2
    params = [SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.5, repetition_penalty=1.4, logprobs=5, seed=1),
              SamplingParams(temperature=1.5, top_k=30),  # no logprobs: still gets a row
              SamplingParams(temperature=2.0, logprobs=0, presence_penalty=2.0, seed=2),
              SamplingParams(temperature=1.0, logprobs=3)]
    rows = [row(p, [1, 2, 3], [4, 5]) for p in params]
    out = sample(logits, rows)
    raw = logits.log_softmax(-1)  # [B, V]
    sampled = out.sampled_token_ids
    assert out.logprob_token_ids.shape == out.logprobs.shape == (5, 6)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, sampled[:, None])[:, 0])
    top_lp, top_ids = raw.topk(5, -1)
    torch.testing.assert_close(out.logprobs[:, 1:], top_lp)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    assert (out.logprobs[:, 1:].diff(dim=1) <= 0).all()
    want_ranks = (raw >= raw.gather(1, sampled[:, None])).sum(-1)  # vLLM: ties count against
    assert torch.equal(out.sampled_ranks, want_ranks)
    assert out.sampled_ranks[0] == 1  # greedy, unpenalised row


def test_top_logprobs_given_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 1.5, 0.0]])
    ids, lps, ranks = top_logprobs(logits, torch.tensor([2, 0]), 2)
    assert ids.tolist() == [[2, 1, 3], [0, 0, 2]]
    assert ranks.tolist() == [3, 1]
    torch.testing.assert_close(lps, logits.log_softmax(-1).gather(1, ids))
    ids0, lps0, _ = top_logprobs(logits, torch.tensor([3, 1]), 0)
    assert ids0.shape == lps0.shape == (2, 1)


# ---- no host sync ---------------------------------------------------------------------------

SYNCING = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"]


def _everything_batch(device: torch.device) -> tuple[torch.Tensor, SamplingMetadata]:
    torch.manual_seed(0)
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.2),
              SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=7),
              SamplingParams(temperature=1.2, frequency_penalty=0.5, presence_penalty=0.3,
                             logit_bias={5: 1.0}, logprobs=1),
              SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[3], eos_token_id=0)]
    rows = [row(p, [1, 2, 3], [4, 4], device) for p in params]
    return torch.randn(4, 100, device=device), SamplingMetadata.build(rows, 100, device)


def test_forward_makes_no_host_sync(monkeypatch):
    logits, meta = _everything_batch(CPU)
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    torch.ones(1).item()  # the patch must see calls, or this test proves nothing
    assert calls == ["item"]
    calls.clear()
    out = Sampler()(logits, meta)
    assert calls == []
    monkeypatch.undo()
    assert out.sampled_token_ids.shape == (4,) and out.logprobs.shape == (4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_makes_no_cuda_sync():
    logits, meta = _everything_batch(torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises on any device->host sync
    try:
        out = Sampler()(logits, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.sampled_token_ids.is_cuda


def test_top_k_top_p_from_candidates_equals_the_full_sort():
    """On CPU, top-k/top-p read each row's TOP_CANDIDATES largest logits and sort a row in full
    only when its set may reach past them: the kept sets are the full sort's, on peaked rows
    (sets inside the candidates) and flat ones (top-p needs more of the vocabulary), with top-k
    off, inside and beyond the candidates, and rows mixing them."""
    from paraserve.layers import sampler

    g = seeded(0)
    V, c = 4000, sampler.TOP_CANDIDATES
    scale = torch.tensor([8.0, 8.0, 0.3, 0.3, 3.0, 3.0, 1.0, 0.05] * 4).unsqueeze(1)  # [32, 1]
    x = torch.randn(32, V, generator=g) * scale
    top_k = torch.tensor([V, 5, V, 3 * c, c, c + 1, 50, V] * 4)
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.5, 1.0, 0.99, 0.7, 1.0,
                          0.3, 0.8, 0.6, 1.0, 0.999, 0.9, 1.0, 0.2] * 2)
    for k, p in [(top_k, top_p), (None, top_p), (top_k, None)]:
        fast = sampler._top_k_top_p_candidates(x.clone(), k, p)
        ref = sampler._top_k_top_p_sorted(x.clone(), k, p)
        assert torch.equal(fast.isinf(), ref.isinf())
        assert torch.equal(fast[~fast.isinf()], x[~fast.isinf()])
    kept = (~sampler._top_k_top_p_candidates(x.clone(), top_k, top_p).isinf()).sum(-1)
    assert (kept > c).any() and (kept < 10).any()  # both regimes ran
