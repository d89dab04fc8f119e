"""Runs one scheduled step: builds input tensors from the scheduler's deltas, runs the model
over the paged KV cache, samples, and reports tokens (and logprobs) back as plain data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from paraserve.attention.backend import AttentionMetadata
from paraserve.attention.forward_context import forward_context
from paraserve.core.outputs import ModelRunnerOutput, SchedulerOutput, TopLogprobs
from paraserve.layers.sampler import Sampler, SamplingMetadata, SamplingRow, top_logprobs
from paraserve.sampling_params import SamplingParams


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + sampled outputs
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: Optional[torch.Generator] = None
    prompt_logprobs: list = field(default_factory=list)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata
    req_ids: list[str]
    sample_rows: list[int]  # request indices that sample this step
    logits_indices: torch.Tensor  # [S] token index of each sampling row's last token
    prompt_lp: dict[int, tuple[int, int, int]]  # req index -> (token start, count, first target pos)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, vocab_size: int, block_size: int,
                 device: torch.device, default_seed: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.default_seed = default_seed
        self.sampler = Sampler()
        self.requests: dict[str, RequestState] = {}

    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        for layer, cache in zip(self.model.attention_layers(), caches):
            layer.kv_cache = cache

    # ---- state -------------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in out.new_requests:
            gen = None
            if new.sampling_params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(new.sampling_params.seed)
            self.requests[new.req_id] = RequestState(
                new.req_id, new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids),
                new.sampling_params, list(new.block_ids), new.num_computed_tokens, gen)
        for cached in out.cached_requests:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ---- inputs ------------------------------------------------------------------------

    def _prepare(self, out: SchedulerOutput) -> StepInputs:
        req_ids = list(out.num_scheduled_tokens)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        logits_idx: list[int] = []
        prompt_lp: dict[int, tuple[int, int, int]] = {}
        bs = self.block_size
        for i, req_id in enumerate(req_ids):
            st = self.requests[req_id]
            n = out.num_scheduled_tokens[req_id]
            s = st.num_computed_tokens
            ids.extend(st.token_ids[s:s + n])
            pos = range(s, s + n)
            positions.extend(pos)
            slots.extend(st.block_ids[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(s + n)
            if s + n >= len(st.token_ids):
                sample_rows.append(i)
                logits_idx.append(starts[-1] - 1)
            if st.params.prompt_logprobs is not None and s + 1 < st.num_prompt_tokens:
                count = min(s + n, st.num_prompt_tokens - 1) - s
                prompt_lp[i] = (starts[-2], count, s + 1)
        max_blocks = max(len(self.requests[r].block_ids) for r in req_ids)
        tables = torch.zeros(len(req_ids), max_blocks, dtype=torch.long)
        for i, req_id in enumerate(req_ids):
            b = self.requests[req_id].block_ids
            tables[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        decode = [i for i in range(len(req_ids)) if starts[i + 1] - starts[i] == 1]
        meta = AttentionMetadata(
            num_reqs=len(req_ids), positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=tables,
            query_start_loc=starts, seq_lens=seq_lens,
            decode_reqs=torch.tensor(decode, dtype=torch.long),
            decode_tokens=torch.tensor([starts[i] for i in decode], dtype=torch.long),
            decode_seq_lens=torch.tensor([seq_lens[i] for i in decode], dtype=torch.long),
            other_reqs=[i for i in range(len(req_ids)) if starts[i + 1] - starts[i] != 1])
        return StepInputs(torch.tensor(ids, dtype=torch.long), meta, req_ids, sample_rows,
                          torch.tensor(logits_idx, dtype=torch.long), prompt_lp)

    # ---- the step ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        if out.is_empty:
            return ModelRunnerOutput({})
        inp = self._prepare(out)
        with forward_context(inp.meta):
            hidden = self.model(inp.input_ids, inp.meta.positions)  # [T, hidden]
        result = ModelRunnerOutput({})
        if inp.prompt_lp:
            self._prompt_logprobs(hidden, inp, result)
        for req_id, n in out.num_scheduled_tokens.items():
            self.requests[req_id].num_computed_tokens += n
        if not inp.sample_rows:
            return result
        logits = self.model.compute_logits(hidden[inp.logits_indices])  # [S, vocab]
        states = [self.requests[inp.req_ids[i]] for i in inp.sample_rows]
        rows = [SamplingRow(st.params, st.token_ids[:st.num_prompt_tokens],
                            st.token_ids[st.num_prompt_tokens:], st.generator) for st in states]
        sampled = self.sampler(logits, SamplingMetadata.build(rows, self.vocab_size, self.device))
        tokens = sampled.sampled_token_ids.tolist()  # the one host sync of the step
        lp = _to_lists(sampled)
        for j, (st, tok) in enumerate(zip(states, tokens)):
            st.token_ids.append(tok)
            result.sampled_token_ids[st.req_id] = [tok]
            if lp is not None and st.params.logprobs is not None:
                ids, vals, rank = lp[0][j], lp[1][j], lp[2][j]
                k = st.params.logprobs + 1
                result.logprobs[st.req_id] = [(ids[:k], vals[:k], rank)]
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: StepInputs,
                         result: ModelRunnerOutput) -> None:
        for i, (start, count, first) in inp.prompt_lp.items():
            st = self.requests[inp.req_ids[i]]
            entries: list[Optional[TopLogprobs]] = [None] if first == 1 else []
            if count > 0:
                logits = self.model.compute_logits(hidden[start:start + count])
                targets = torch.tensor(st.token_ids[first:first + count], dtype=torch.long)
                ids, vals, ranks = top_logprobs(logits, targets, st.params.prompt_logprobs)
                for a, b, r in zip(ids.tolist(), vals.tolist(), ranks.tolist()):
                    entries.append((a, b, r))
            result.prompt_logprobs[st.req_id] = entries


def _to_lists(sampled) -> Optional[tuple[list, list, list]]:
    if sampled.logprob_token_ids is None:
        return None
    return (sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(),
            sampled.sampled_ranks.tolist())
