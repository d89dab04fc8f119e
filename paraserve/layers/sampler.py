"""Batched sampling in torch: logit processors, greedy/random selection and logprobs.

SamplingMetadata is built once per step from plain Python rows (the only place that reads
lists); Sampler.forward() then runs without host syncs -- no .item()/.tolist(), no
boolean-mask indexing or data-dependent shapes -- so on GPU the one sync of a step is the
caller reading `sampled_token_ids`. Semantics follow vLLM v1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from paraserve.ops import cpu
from paraserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One request's sampling state at this step."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far: penalties and min_tokens read it
    generator: Optional[torch.Generator] = None  # set iff params.seed; the caller keeps it


@dataclass
class SamplingMetadata:
    """Per-step tensors of a batch. A None tensor means no row needs that processor."""
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so dividing is harmless
    greedy_mask: Optional[torch.Tensor]  # [B] bool; None when all greedy or all random
    top_k: Optional[torch.Tensor]  # [B] int64 in [1, V]; V where disabled
    top_p: Optional[torch.Tensor]  # [B] float32; 1.0 where disabled
    min_p: Optional[torch.Tensor]  # [B] float32; 0.0 where disabled
    repetition_penalty: Optional[torch.Tensor]  # [B, 1]
    frequency_penalty: Optional[torch.Tensor]  # [B, 1]
    presence_penalty: Optional[torch.Tensor]  # [B, 1]
    prompt_mask: Optional[torch.Tensor]  # [B, V] bool: token occurs in the prompt
    output_counts: Optional[torch.Tensor]  # [B, V] float32: occurrences in the output
    bias_index: Optional[tuple[torch.Tensor, torch.Tensor]]  # ([nb] rows, [nb] token ids)
    bias_values: Optional[torch.Tensor]  # [nb] float32
    blocked_index: Optional[tuple[torch.Tensor, torch.Tensor]]  # min_tokens: ([nm] rows, [nm] ids)
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # random rows only
    all_greedy: bool = False
    all_random: bool = False
    max_num_logprobs: Optional[int] = None  # None: no row wants sample logprobs

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalty is None

    @property
    def no_logit_processing(self) -> bool:
        """True when the processed logits equal the raw ones (the all-greedy fast path)."""
        return self.no_penalties and self.bias_index is None and self.blocked_index is None

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int,
              device: torch.device) -> "SamplingMetadata":
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        random_params = [p for p, g in zip(params, greedy) if not g]

        def vec(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        def per_row(get, disabled, dtype: torch.dtype) -> torch.Tensor:
            # greedy rows never reach top-k/top-p/min-p; give them the no-op value
            return vec([disabled if g else get(p) for p, g in zip(params, greedy)], dtype)

        all_greedy, all_random = all(greedy), not any(greedy)
        penalised = any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                        or p.presence_penalty != 0.0 for p in params)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        bias_index, bias_values = _logit_bias(params, vocab_size, device)
        return cls(
            temperature=per_row(lambda p: p.temperature, 1.0, torch.float32),
            greedy_mask=None if all_greedy or all_random else vec(greedy, torch.bool),
            top_k=per_row(lambda p: min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size,
                          vocab_size, torch.int64)
            if any(0 < p.top_k < vocab_size for p in random_params) else None,
            top_p=per_row(lambda p: p.top_p, 1.0, torch.float32)
            if any(p.top_p < 1.0 for p in random_params) else None,
            min_p=per_row(lambda p: p.min_p, 0.0, torch.float32)
            if any(p.min_p > 0.0 for p in random_params) else None,
            repetition_penalty=vec([[p.repetition_penalty] for p in params], torch.float32)
            if penalised else None,
            frequency_penalty=vec([[p.frequency_penalty] for p in params], torch.float32)
            if penalised else None,
            presence_penalty=vec([[p.presence_penalty] for p in params], torch.float32)
            if penalised else None,
            prompt_mask=_counts([r.prompt_token_ids for r in rows], vocab_size, device) > 0
            if penalised else None,
            output_counts=_counts([r.output_token_ids for r in rows], vocab_size, device)
            if penalised else None,
            bias_index=bias_index,
            bias_values=bias_values,
            blocked_index=_min_tokens_blocked(rows, vocab_size, device),
            generators={i: r.generator for i, r in enumerate(rows)
                        if r.generator is not None and not greedy[i]},
            all_greedy=all_greedy,
            all_random=all_random,
            max_num_logprobs=max(logprobs) if logprobs else None,
        )


def _counts(seqs: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 token occurrence counts, scattered on the device."""
    width = max((len(s) for s in seqs), default=0)
    # pad with an extra "token" V whose column is dropped: one scatter for ragged rows
    padded = torch.tensor([s + [vocab_size] * (width - len(s)) for s in seqs],
                          dtype=torch.int64, device=device).view(len(seqs), width)
    padded.clamp_(max=vocab_size)  # ids past the LM head (embedding vocab larger) can't recur
    counts = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def _logit_bias(params: list[SamplingParams], vocab_size: int, device: torch.device
                ) -> tuple[Optional[tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor]]:
    # out-of-vocab ids are dropped here: one bad request must not fail the whole batch's
    # step (the engine should reject them at admission)
    entries = [(i, tok, bias) for i, p in enumerate(params)
               for tok, bias in (p.logit_bias or {}).items() if 0 <= tok < vocab_size]
    if not entries:
        return None, None
    rows, toks, vals = zip(*entries)
    index = (torch.tensor(rows, device=device), torch.tensor(toks, device=device))
    return index, torch.tensor(vals, dtype=torch.float32, device=device)


def _min_tokens_blocked(rows: list[SamplingRow], vocab_size: int, device: torch.device
                        ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, token ids) of EOS/stop ids to mask while a row is below min_tokens."""
    pairs = []
    for i, r in enumerate(rows):
        p = r.params
        if len(r.output_token_ids) >= p.min_tokens:
            continue
        stops = set(p.stop_token_ids or [])
        if p.eos_token_id is not None:
            stops.add(p.eos_token_id)
        pairs += [(i, t) for t in sorted(stops) if 0 <= t < vocab_size]
    if not pairs:
        return None
    rows_, toks = zip(*pairs)
    return torch.tensor(rows_, device=device), torch.tensor(toks, device=device)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: Optional[torch.Tensor] = None  # [B, 1 + N]: sampled, then top-N
    logprobs: Optional[torch.Tensor] = None  # [B, 1 + N] float32
    sampled_ranks: Optional[torch.Tensor] = None  # [B] int64, 1-based, in the raw distribution


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [B, V] any float dtype; it is not modified."""
        if meta.all_greedy and meta.no_logit_processing:
            sampled = argmax(logits)  # [B]
        else:
            x = logits.to(torch.float32, copy=True)  # [B, V]; raw logits stay intact for logprobs
            sampled = self._select(process_logits(x, meta), meta)
        if meta.max_num_logprobs is None:
            return SamplerOutput(sampled)
        # vLLM v1's default "raw" logprobs: before penalties and temperature
        ids, lps, ranks = top_logprobs(logits, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)

    @staticmethod
    def _select(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.all_greedy:
            return argmax(x)
        greedy = None if meta.all_random else argmax(x)  # [B]; before x is modified below
        sampled = _sample(x, meta)  # [B]
        return sampled if greedy is None else torch.where(meta.greedy_mask, greedy, sampled)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B]: the first maximum of each row, as torch.argmax; the CPU kernel runs rows in
    parallel (torch's CPU argmax over a 49k vocabulary took ~5 ms for 64 rows, 5x the kernel)."""
    if x.dim() == 2 and x.stride(1) == 1 and cpu.applies(x):
        return cpu.kernels().argmax_rows(x)
    return x.argmax(-1)


def process_logits(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Processors that can change the greedy choice, in vLLM's order: logit_bias,
    min_tokens, penalties. x: [B, V] float32, modified in place where possible."""
    if meta.bias_index is not None:
        x.index_put_(meta.bias_index, meta.bias_values, accumulate=True)
    if meta.blocked_index is not None:
        x.index_put_(meta.blocked_index, torch.full((), float("-inf"), device=x.device))
    if not meta.no_penalties:
        seen = meta.prompt_mask | (meta.output_counts > 0)  # [B, V]
        rep = torch.where(seen, meta.repetition_penalty, 1.0)  # [B, V]
        # torch.where, not x[x > 0] /= ...: boolean indexing would sync on GPU
        x = torch.where(x > 0, x / rep, x * rep)
        x -= meta.frequency_penalty * meta.output_counts
        x -= meta.presence_penalty * (meta.output_counts > 0)
    return x


def sampling_probs(x: torch.Tensor, meta: SamplingMetadata, normalize: bool = True) -> torch.Tensor:
    """The distribution a random row is drawn from: x [B, V] float32 logits after process_logits
    (modified in place) -> temperature, top-k, top-p, min-p -> probabilities [B, V]. Speculative
    verification uses it too, so sampling and verification cannot drift apart."""
    x.div_(meta.temperature.unsqueeze(1))
    if meta.top_k is not None or meta.top_p is not None:
        x = _apply_top_k_top_p(x, meta.top_k, meta.top_p)
    probs = x.softmax(-1)  # [B, V]
    if meta.min_p is not None:
        threshold = meta.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)  # [B, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
        if normalize:
            probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _sample(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then an inverse-CDF draw. Modifies x."""
    # no renormalisation needed: the draw scales u by each row's sum
    return inverse_cdf(sampling_probs(x, meta, normalize=False), meta.generators)


# top-k/top-p on CPU look at each row's most likely tokens first; a row whose top-k or top-p set
# reaches past them is sorted in full. A full sort of a 49k vocabulary costs ~1.8 ms per row
# here, topk(256) ~0.09 ms: speculative verification filters every tree node's row.
TOP_CANDIDATES = 256


def _apply_top_k_top_p(x: torch.Tensor, top_k: Optional[torch.Tensor],
                       top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Set to -inf the logits outside each row's top-k and top-p sets (vLLM's scheme: top-k
    first, then the smallest most-likely set whose renormalised mass reaches top_p)."""
    if x.device.type == "cpu" and x.shape[1] > TOP_CANDIDATES:
        return _top_k_top_p_candidates(x, top_k, top_p)
    return _top_k_top_p_sorted(x, top_k, top_p)


def _top_k_top_p_candidates(x: torch.Tensor, top_k: Optional[torch.Tensor],
                            top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """_top_k_top_p_sorted's sets from each row's TOP_CANDIDATES largest logits: a row keeps
    the logits at or above its smallest kept candidate (top-k: the k-th largest; top-p: the
    candidates, in descending order, whose preceding mass is below top_p). Rows whose set may
    reach past the candidates (k above them, or top_p more than their mass) are sorted in full."""
    B, V = x.shape
    c = TOP_CANDIDATES
    vals = x.topk(c, -1).values  # [B, c] descending
    keep = torch.ones_like(vals, dtype=torch.bool)  # [B, c]
    bounded = torch.zeros(B, dtype=torch.bool)  # the row's set ends among its candidates
    unbounded = torch.zeros(B, dtype=torch.bool)  # it may not: sort the row in full
    if top_k is not None:
        active, inside = top_k < V, top_k <= c
        bounded |= active & inside
        unbounded |= active & ~inside
        kth = vals.gather(1, (top_k.clamp(max=c) - 1).unsqueeze(1))  # [B, 1]
        kth = kth.masked_fill_(~(active & inside).unsqueeze(1), float("-inf"))
        keep &= vals >= kth
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        # the candidates' probabilities over the whole row (after top-k)
        probs = (vals - x.logsumexp(-1, keepdim=True)).exp().masked_fill_(~keep, 0.0)  # [B, c]
        keep &= (probs.cumsum(-1) - probs) < top_p.unsqueeze(1)  # mass before each < top_p
        active, inside = top_p < 1.0, probs.sum(-1) >= top_p
        unbounded |= active & ~inside & ~bounded
        bounded |= active & inside
    bounded &= ~unbounded
    smallest = torch.where(keep, vals, float("inf")).amin(-1, keepdim=True)  # [B, 1]
    cut = smallest.masked_fill_(~bounded.unsqueeze(1), float("-inf"))
    rows = unbounded.nonzero().squeeze(1)
    if len(rows):
        sorted_rows = _top_k_top_p_sorted(x[rows], None if top_k is None else top_k[rows],
                                          None if top_p is None else top_p[rows])
    x = x.masked_fill_(x < cut, float("-inf"))
    if len(rows):
        x[rows] = sorted_rows
    return x


def _top_k_top_p_sorted(x: torch.Tensor, top_k: Optional[torch.Tensor],
                        top_p: Optional[torch.Tensor]) -> torch.Tensor:
    sorted_x, order = x.sort(-1)  # [B, V] ascending: row-wise thresholds become gathers
    if top_k is not None:
        kth = sorted_x.gather(1, (x.shape[1] - top_k).unsqueeze(1))  # [B, 1]
        sorted_x.masked_fill_(sorted_x < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_x.softmax(-1).cumsum(-1)  # [B, V]
        # drop the low tail whose mass is <= 1 - p: what stays has mass >= p, and is minimal
        drop = cum <= 1.0 - top_p.unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        sorted_x.masked_fill_(drop, float("-inf"))
    return x.scatter_(1, order, sorted_x)


def inverse_cdf(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One uniform u per row; the token is the first whose running sum of probs passes u times the
    row's sum. A seeded request draws its one number from its own generator, so its stream, and
    thus its tokens, do not depend on the batch it lands in. (An exponential race needs V draws
    per row: ~1 ms for a 49k vocabulary on CPU, a quarter second per step at batch 256.)"""
    u = torch.rand(probs.shape[0], device=probs.device)  # [B]
    for i, g in generators.items():
        u[i] = torch.rand((), generator=g, device=probs.device)
    if cpu.applies(probs) and probs.dtype == torch.float32 and probs.stride(-1) == 1:
        return cpu.kernels().sample_rows(probs, u)
    cdf = probs.cumsum(-1)  # [B, V]; no host sync on GPU
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return picked.clamp_(max=probs.shape[1] - 1)


def top_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 log_softmax of logits [B, V]; returns ids [B, 1+k] (given token, then top-k),
    their logprobs [B, 1+k], and the 1-based rank of the given token [B]."""
    logprobs = logits.to(torch.float32).log_softmax(-1)  # [B, V]
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.int64).view(-1, 1)  # [B, 1]
    token_lp = logprobs.gather(1, token_ids)  # [B, 1]
    ranks = (logprobs >= token_lp).sum(-1)  # [B]; as vLLM: ties count against the token
    k = min(k, logprobs.shape[1])
    if k == 0:
        return token_ids, token_lp, ranks
    top_lp, top_ids = logprobs.topk(k, -1)  # [B, k] sorted descending
    return torch.cat([token_ids, top_ids], 1), torch.cat([token_lp, top_lp], 1), ranks
