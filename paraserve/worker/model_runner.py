"""Runs one scheduled step: builds input tensors from the scheduler's deltas, runs the model
over the paged KV cache, samples, and reports tokens (and logprobs) back as plain data.

With speculative decoding, a decoding request may carry a draft tree (proposed at the end of
the previous step). Its 1 + k scheduled tokens are the tree's first nodes, fed at positions
num_computed_tokens + depth with an ancestor-only mask, in consecutive KV slots. After
verification the accepted path's K/V rows are copied to the slots right after the context
(node at depth j to slot num_computed + j): exactly what plain decoding would have written
there, since each node attended to its ancestors only. The slots of rejected nodes are garbage
past the new length; the blocks holding only them are released (by the scheduler, and
mirrored here in the block table).

Several ranks (tensor/context parallel) run one batch together, each with its own runner. They
compute the same logits, but only the model-parallel group's rank 0 (the source) samples and
verifies; the others take its tokens, accepted paths and draft trees by broadcast. That keeps
every runner's token state equal to the source's whatever the sampling: unseeded draws come
from the source's RNG alone, seeded ones from the source's per-request generators, and no
rank depends on another computing bit-identical floats. The source's output is the step's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from paraserve.attention.backend import AttentionMetadata
from paraserve.attention.forward_context import forward_context
from paraserve.core.outputs import ModelRunnerOutput, SchedulerOutput, TopLogprobs
from paraserve.distributed import comm
from paraserve.distributed.parallel_state import get_cp_group, get_mp_group
from paraserve.distributed.ring import RingStats
from paraserve.layers.sampler import Sampler, SamplingMetadata, SamplingRow, top_logprobs
from paraserve.sampling_params import SamplingParams
from paraserve.spec_decode.speculator import Speculator
from paraserve.spec_decode.tree import DraftTree, PackedTrees, pack_trees
from paraserve.worker.cp_inputs import CPPlan, plan_step
from paraserve.worker.decode_stack import DecodeStack


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + sampled outputs
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    max_tokens: int  # output tokens it may have (max_tokens capped by the context)
    generator: Optional[torch.Generator] = None
    prompt_logprobs: list = field(default_factory=list)
    tree: Optional[DraftTree] = None  # drafts for the next step; root = token_ids[-1]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(self.params, self.token_ids[:self.num_prompt_tokens],
                           self.token_ids[self.num_prompt_tokens:], self.generator)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata
    req_ids: list[str]
    sample_rows: list[int]  # request indices that sample this step
    # [S + sum of tree sizes]: the last token of each sampling row, then every tree node
    logits_indices: torch.Tensor
    prompt_lp: dict[int, tuple[int, int, int]]  # req index -> (token start, count, first target pos)
    tree_rows: list[int] = field(default_factory=list)  # request indices verifying a tree
    trees: Optional[PackedTrees] = None  # their trees, in tree_rows order
    cp: Optional[CPPlan] = None  # context parallel: this CP rank's share of the step


class ModelRunner:
    def __init__(self, model: torch.nn.Module, vocab_size: int, block_size: int,
                 device: torch.device, default_seed: int, max_model_len: int,
                 speculator: Optional[Speculator] = None, cp_local_size: Optional[int] = None,
                 enforce_eager: bool = False) -> None:
        self.model = model
        self.enforce_eager = enforce_eager  # no C++ decoder stack: every step runs the modules
        self.stack: Optional[DecodeStack] = None
        self.kv_cache: Optional[torch.Tensor] = None  # [layers, 2, blocks, block_size, KVH, D]
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.default_seed = default_seed
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self.spec = speculator
        self.requests: dict[str, RequestState] = {}
        self.group = get_mp_group()  # the ranks that run this batch with us
        self.is_source = self.group.rank == 0  # samples for the group; its output is the step's
        self.cp = get_cp_group()  # block_size spans the CP ranks: each stores block_size / cp
        self.cp_local_size = cp_local_size
        # context parallel: prefill chunks run by ring attention, and those with cached context
        self.ring_chunks = {"chunks": 0, "with_context": 0}
        self.ring_stats = RingStats()  # their ring's bytes and overlap

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        """cache: [num_layers, 2, num_blocks, block_size, KVH, D]; each attention layer gets its
        (contiguous) view."""
        for layer, layer_cache in zip(self.model.attention_layers(), cache.unbind(0)):
            layer.kv_cache = layer_cache
        self.kv_cache = cache
        self.stack = None if self.enforce_eager else DecodeStack.build(self.model)

    # ---- state -------------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in out.new_requests:
            gen = None
            if new.sampling_params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(new.sampling_params.seed)
            room = self.max_model_len - len(new.prompt_token_ids)
            limit = new.sampling_params.max_tokens
            self.requests[new.req_id] = RequestState(
                new.req_id, new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids),
                new.sampling_params, list(new.block_ids), new.num_computed_tokens,
                room if limit is None else min(limit, room), gen)
        for cached in out.cached_requests:
            state = self.requests[cached.req_id]
            if len(state.block_ids) != -(-cached.num_computed_tokens // self.block_size):
                raise RuntimeError(f"block table of {cached.req_id} out of step with the scheduler")
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _slot(self, st: RequestState, pos: int) -> int:
        return st.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    # ---- inputs ------------------------------------------------------------------------

    def _prepare(self, out: SchedulerOutput) -> StepInputs:
        if self.cp.size > 1:
            return self._prepare_cp(out)
        req_ids = list(out.num_scheduled_tokens)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        logits_idx: list[int] = []
        prompt_lp: dict[int, tuple[int, int, int]] = {}
        tree_rows: list[int] = []
        trees: list[DraftTree] = []
        for i, req_id in enumerate(req_ids):
            st = self.requests[req_id]
            n = out.num_scheduled_tokens[req_id]
            s = st.num_computed_tokens
            tree, st.tree = st.tree, None  # this step verifies the drafts or drops them
            k = out.num_draft_tokens.get(req_id, 0)
            if k:
                tree = self._scheduled_tree(st, tree, k, n)
                ids.extend(tree.tokens)
                positions.extend(s + d for d in tree.depth)
                tree_rows.append(i)
                trees.append(tree)
            else:
                ids.extend(st.token_ids[s:s + n])
                positions.extend(range(s, s + n))
            slots.extend(self._slot(st, p) for p in range(s, s + n))
            starts.append(starts[-1] + n)
            seq_lens.append(s + n)
            if not k and s + n >= len(st.token_ids):
                sample_rows.append(i)
                logits_idx.append(starts[-1] - 1)
            if st.params.prompt_logprobs is not None and s + 1 < st.num_prompt_tokens:
                count = min(s + n, st.num_prompt_tokens - 1) - s
                prompt_lp[i] = (starts[-2], count, s + 1)
        for i in tree_rows:
            logits_idx.extend(range(starts[i], starts[i + 1]))
        meta = self._attention_metadata(req_ids, positions, slots, starts, seq_lens)
        packed = None
        if trees:
            packed = pack_trees(trees, self.device)
            meta.custom_masks = {tree_rows[b]: mask for b, mask in packed.request_masks().items()}
        return StepInputs(torch.tensor(ids, dtype=torch.long), meta, req_ids, sample_rows,
                          torch.tensor(logits_idx, dtype=torch.long), prompt_lp, tree_rows, packed)

    def _prepare_cp(self, out: SchedulerOutput) -> StepInputs:
        """Context parallel: this CP rank's tokens (worker/cp_inputs.py)."""
        req_ids = list(out.num_scheduled_tokens)
        reqs, sample_rows = [], []
        for i, req_id in enumerate(req_ids):
            st, n = self.requests[req_id], out.num_scheduled_tokens[req_id]
            if out.num_draft_tokens.get(req_id):
                raise RuntimeError("speculative decoding does not run with context parallelism")
            reqs.append((st.token_ids, st.block_ids, st.num_computed_tokens, n,
                         st.params.prompt_logprobs is None))
            if st.num_computed_tokens + n >= len(st.token_ids):
                sample_rows.append(i)
        plan = plan_step(reqs, self.cp, self.block_size // self.cp.size, self.cp_local_size,
                         self.ring_stats)
        self.ring_chunks["chunks"] += len(plan.step.rings)
        self.ring_chunks["with_context"] += sum(p.first_new > 0 for p in plan.step.rings)
        prompt_lp: dict[int, tuple[int, int, int]] = {}
        for i, (st, (_, _, s, n, _)) in enumerate(zip((self.requests[r] for r in req_ids), reqs)):
            if st.params.prompt_logprobs is not None and s + 1 < st.num_prompt_tokens:
                prompt_lp[i] = (plan.starts[i], min(s + n, st.num_prompt_tokens - 1) - s, s + 1)
        none = torch.zeros(0, dtype=torch.long)
        meta = AttentionMetadata(
            num_reqs=len(req_ids), positions=torch.tensor(plan.positions, dtype=torch.long),
            slot_mapping=none, block_tables=none.view(0, 0), query_start_loc=plan.starts + [len(plan.input_ids)],
            seq_lens=[r[2] + r[3] for r in reqs], decode_reqs=none, decode_tokens=none,
            decode_seq_lens=none, other_reqs=[])
        meta.scratch["cp"] = plan.step.to(self.device)
        rows = [plan.last_token[i] if plan.last_token[i] is not None else -1 for i in sample_rows]
        return StepInputs(torch.tensor(plan.input_ids, dtype=torch.long), meta, req_ids, sample_rows,
                          torch.tensor(rows, dtype=torch.long), prompt_lp, cp=plan)

    def _cp_sample_hidden(self, hidden: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        """[S, hidden] the sampling rows' hidden states on every CP rank: a ring prompt's last
        token lives on one rank, so each row is summed over the group from its one holder (a
        replicated row's holder is CP rank 0)."""
        plan, idx = inp.cp, inp.logits_indices.tolist()
        ring = [inp.sample_rows[j] in plan.ring_requests for j in range(len(idx))]
        if not any(ring):
            return hidden[inp.logits_indices]
        rows = hidden.new_zeros(len(idx), hidden.shape[-1])
        for j, (row, is_ring) in enumerate(zip(idx, ring)):
            if row >= 0 and (is_ring or self.cp.rank == 0):
                rows[j] = hidden[row]
        return comm.all_reduce(rows, self.cp)

    @staticmethod
    def _scheduled_tree(st: RequestState, tree: Optional[DraftTree], k: int, n: int) -> DraftTree:
        if tree is None or tree.num_nodes < 1 + k or n != 1 + k or tree.tokens[0] != st.token_ids[-1]:
            raise RuntimeError(f"{st.req_id}: scheduled {k} draft tokens the runner does not hold")
        return tree.prefix(1 + k)

    def _attention_metadata(self, req_ids: list[str], positions: list[int], slots: list[int],
                            starts: list[int], seq_lens: list[int]) -> AttentionMetadata:
        # few tensors, each from lists in one call: at batch 1 the step's metadata is ~10 small
        # tensors, and each costs more than the lists behind it (the rows of a 2-D tensor are
        # contiguous views)
        blocks = [self.requests[r].block_ids for r in req_ids]
        max_blocks = max(map(len, blocks))
        tables = torch.tensor([b + [0] * (max_blocks - len(b)) for b in blocks],
                              dtype=torch.long).view(len(req_ids), max_blocks)
        decode = [i for i in range(len(req_ids)) if starts[i + 1] - starts[i] == 1]
        token_rows = torch.tensor([positions, slots], dtype=torch.long).view(2, len(positions))
        dec = torch.tensor([decode, [starts[i] for i in decode], [seq_lens[i] for i in decode]],
                           dtype=torch.long).view(3, len(decode))
        return AttentionMetadata(
            num_reqs=len(req_ids), positions=token_rows[0], slot_mapping=token_rows[1], block_tables=tables,
            query_start_loc=starts, seq_lens=seq_lens, decode_reqs=dec[0], decode_tokens=dec[1],
            decode_seq_lens=dec[2], other_reqs=[i for i in range(len(req_ids)) if starts[i + 1] - starts[i] != 1])

    # ---- the step ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        if out.is_empty:
            return ModelRunnerOutput({})
        inp = self._prepare(out)
        with forward_context(inp.meta):
            hidden = self.stack.forward(inp.input_ids, inp.meta) if self.stack is not None else None
            if hidden is None:
                hidden = self.model(inp.input_ids, inp.meta.positions)  # [T, hidden]
        result = ModelRunnerOutput({})
        if inp.prompt_lp:
            self._prompt_logprobs(hidden, inp, result)
        tree_ids = {inp.req_ids[i] for i in inp.tree_rows}
        for req_id, n in out.num_scheduled_tokens.items():
            if req_id not in tree_ids:  # a tree's requests advance by what it accepts
                self.requests[req_id].num_computed_tokens += n
        if not inp.logits_indices.numel():
            return result
        rows = hidden[inp.logits_indices] if inp.cp is None else self._cp_sample_hidden(hidden, inp)
        logits = self.model.compute_logits(rows)  # [S + tree nodes, vocab]
        S = len(inp.sample_rows)
        # (request, flat row of the hidden state that chose its last token) for the drafter
        advanced: list[tuple[RequestState, int]] = []
        if S:
            self._sample(logits[:S], inp, result, advanced)
        if inp.trees is not None:
            self._verify(logits[S:], inp, result, advanced)
        if self.spec is not None and out.propose_drafts and advanced:
            self._propose(hidden, advanced, result)
        return result

    def _sample(self, logits: torch.Tensor, inp: StepInputs, result: ModelRunnerOutput,
                advanced: list[tuple[RequestState, int]]) -> None:
        states = [self.requests[inp.req_ids[i]] for i in inp.sample_rows]
        lp = None
        if self.is_source:
            meta = SamplingMetadata.build([st.sampling_row() for st in states], self.vocab_size, self.device)
            sampled = self.sampler(logits, meta)
            chosen = sampled.sampled_token_ids.to(torch.int64).contiguous()
            lp = _to_lists(sampled)
        else:
            chosen = torch.empty(len(states), dtype=torch.int64, device=self.device)
        tokens = comm.broadcast(chosen, self.group).tolist()  # the one host sync of plain sampling
        rows = inp.logits_indices[:len(states)].tolist()
        for j, (st, tok) in enumerate(zip(states, tokens)):
            st.token_ids.append(tok)
            result.sampled_token_ids[st.req_id] = [tok]
            advanced.append((st, rows[j]))
            if lp is not None and st.params.logprobs is not None:
                ids, vals, rank = lp[0][j], lp[1][j], lp[2][j]
                k = st.params.logprobs + 1
                result.logprobs[st.req_id] = [(ids[:k], vals[:k], rank)]

    def _verify(self, logits: torch.Tensor, inp: StepInputs, result: ModelRunnerOutput,
                advanced: list[tuple[RequestState, int]]) -> None:
        """logits: [tree nodes, vocab], tree after tree. Emits the accepted drafts and the bonus
        token of each tree and moves the accepted K/V into place."""
        trees = inp.trees
        states = [self.requests[inp.req_ids[i]] for i in inp.tree_rows]
        rows = None
        if self.is_source:  # (reading the argmax is the one host sync of verification)
            rows = self.spec.verify(logits, trees, [st.sampling_row() for st in states])
        rows = comm.broadcast_object(rows, self.group)
        L = trees.beam_length
        src: list[int] = []
        dst: list[int] = []
        lp_rows: list[int] = []  # for logprobs: the logits row that chose each emitted token
        lp_tokens: list[int] = []
        for b, (st, row) in enumerate(zip(states, rows)):
            m, last = row[0], row[1]
            nodes, tokens = row[2:2 + m], row[2 + L:3 + L + m]
            base = st.num_computed_tokens  # the root's slot
            for depth, node in enumerate(nodes, start=1):
                if node != depth:  # off the first beam: its K/V is not in place yet
                    src.append(self._slot(st, base + node))
                    dst.append(self._slot(st, base + depth))
            st.num_computed_tokens = base + 1 + m
            del st.block_ids[-(-st.num_computed_tokens // self.block_size):]  # as the scheduler trims
            st.token_ids.extend(tokens)
            result.sampled_token_ids[st.req_id] = tokens
            first = trees.query_start_loc[b]
            advanced.append((st, inp.meta.query_start_loc[inp.tree_rows[b]] + last))
            if st.params.logprobs is not None:
                lp_rows.extend(first + n for n in [0] + nodes)
                lp_tokens.extend(tokens)
        self._move_kv(src, dst)
        if lp_rows and self.is_source:
            self._tree_logprobs(logits, states, lp_rows, lp_tokens, result)

    def _move_kv(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of slots `src` to slots `dst` in every layer. Pairs come in depth order
        per request, and one by one that order is safe: the copy to depth j's slot may overwrite
        the node of an earlier depth (already read), never one still to read (a node at depth
        k > j has an id of at least k). The batched copy gathers everything first anyway."""
        if not src:
            return
        cache = self.kv_cache  # [layers, 2, num_blocks, block_size, KVH, D]: every layer at once
        flat = cache.view(*cache.shape[:2], -1, *cache.shape[-2:])  # [layers, 2, num_slots, KVH, D]
        if len(src) <= 4:  # a batch-1 step's few moves: a strided copy each (~4 us) beats indexing (~45 us)
            for a, b in zip(src, dst):
                flat.select(2, b).copy_(flat.select(2, a))
            return
        s = torch.tensor(src, dtype=torch.long, device=self.device)
        flat.index_copy_(2, torch.tensor(dst, dtype=torch.long, device=self.device), flat.index_select(2, s))

    def _tree_logprobs(self, logits: torch.Tensor, states: list[RequestState], rows: list[int],
                       tokens: list[int], result: ModelRunnerOutput) -> None:
        k = max(st.params.logprobs for st in states if st.params.logprobs is not None)
        ids, vals, ranks = top_logprobs(logits[torch.tensor(rows)], torch.tensor(tokens), k)
        ids, vals, ranks = ids.tolist(), vals.tolist(), ranks.tolist()
        j = 0
        for st in states:
            if st.params.logprobs is None:
                continue
            n, keep = len(result.sampled_token_ids[st.req_id]), st.params.logprobs + 1
            result.logprobs[st.req_id] = [(ids[r][:keep], vals[r][:keep], ranks[r])
                                          for r in range(j, j + n)]
            j += n

    def _propose(self, hidden: torch.Tensor, advanced: list[tuple[RequestState, int]],
                 result: ModelRunnerOutput) -> None:
        """Draft trees for the requests that got tokens this step, to verify next step."""
        picked, depths, rows = [], [], []
        for st, row in advanced:
            # a path may hold what max_tokens leaves after the bonus token; that also keeps
            # every node's position inside the context
            depth = st.max_tokens - st.num_output_tokens - 1
            if depth >= 1 and self.spec.eligible(st.params, st.num_output_tokens):
                picked.append(st)
                depths.append(depth)
                rows.append(row)
        if not picked:
            return
        h = hidden[torch.tensor(rows)] if self.spec.needs_hidden_states else None  # [B, hidden]
        # every rank proposes (a drafter may run collectives, e.g. the vocab-parallel embedding);
        # the source's trees are the ones verified, so all ranks take them
        trees = comm.broadcast_object(self.spec.propose([st.token_ids for st in picked], depths, h),
                                      self.group)
        for st, tree in zip(picked, trees):
            if tree is not None:
                st.tree = tree
                result.num_draft_tokens[st.req_id] = tree.num_nodes - 1

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
