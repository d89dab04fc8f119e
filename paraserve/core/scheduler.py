"""Token-budget scheduler: each step, computed tokens catch up with known tokens.

Running requests go first (decodes and unfinished prefill chunks), then waiting ones, all
within max_num_batched_tokens and max_num_seqs. When blocks run out the lowest-priority,
newest running request is preempted: its blocks are freed and it is recomputed later.

Speculative decoding adds no phase either. A decoding request whose runner proposed k draft
tokens (a tree of 1 + k nodes, node 0 its last token) is scheduled for 1 + k tokens, with KV
slots for all of them; the runner verifies the tree and keeps the accepted path's KV in the
slots right after the context. The request's computed tokens then step back by the rejected
drafts and the blocks past them are released, so a running request always holds exactly the
blocks of its computed tokens, and only fully verified blocks are ever prefix-cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from paraserve.config import CacheConfig, SchedulerConfig, SpecConfig
from paraserve.core.kv_cache_manager import KVCacheManager
from paraserve.core.outputs import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                    SchedulerOutput)
from paraserve.core.request import Request, RequestStatus


@dataclass
class SpecDecodingStats:
    """Speculative decoding counters (cumulative in the scheduler, per step in StepStats)."""
    num_drafts: int = 0  # tree verifications
    num_draft_tokens: int = 0  # draft tokens verified (tree nodes after the root)
    num_accepted_tokens: int = 0  # of which accepted (the bonus token not included)

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens. For a tree, the nodes off the accepted path count as
        drafted too: a wide tree has a low rate even when it is accepted deep."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification step emits on average: accepted drafts plus the bonus token."""
        return (self.num_accepted_tokens + self.num_drafts) / self.num_drafts if self.num_drafts else 0.0


@dataclass
class StepStats:
    num_running: int = 0
    num_waiting: int = 0
    num_scheduled_tokens: int = 0
    num_preemptions: int = 0
    spec: SpecDecodingStats = field(default_factory=SpecDecodingStats)  # this step's verifications


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 max_model_len: int, spec: Optional[SpecConfig] = None) -> None:
        self.max_num_seqs = sched.max_num_seqs
        self.token_budget = sched.max_num_batched_tokens
        self.chunked_prefill = sched.enable_chunked_prefill
        self.max_model_len = max_model_len
        # speculate only while at most this many requests run (None: never)
        self.spec_max_running = None if spec is None else spec.disable_by_batch_size
        self.spec_stats = SpecDecodingStats()
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # to tell the runner to drop their state
        self.num_preemptions = 0
        self.last_stats = StepStats()

    # ---- admission -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        need = self.kv.blocks_needed(request.num_prompt_tokens + 1)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"the prompt ({request.num_prompt_tokens} tokens) needs {need} KV blocks but the "
                f"cache has {self.kv.num_blocks}: raise --kv-cache-memory or shorten the prompt")
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        num_scheduled: dict[str, int] = {}
        num_drafts: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()

        budget = self._schedule_running(num_scheduled, num_drafts, cached_reqs, preempted)
        if not preempted:
            budget = self._admit_waiting(budget, num_scheduled, new_reqs)

        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        out = SchedulerOutput(
            new_requests=new_reqs, cached_requests=cached_reqs, num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_ids, preempted_req_ids=preempted,
            num_draft_tokens=num_drafts, propose_drafts=self._speculating())
        self._finished_ids = set()
        self.last_stats = StepStats(len(self.running), len(self.waiting),
                                    out.total_num_scheduled_tokens, len(preempted))
        return out

    def _speculating(self) -> bool:
        return self.spec_max_running is not None and len(self.running) <= self.spec_max_running

    def _schedule_running(self, num_scheduled: dict[str, int], num_drafts: dict[str, int],
                          cached_reqs: list[CachedRequestData], preempted: set[str]) -> int:
        """Decodes (with their drafts) and unfinished prefill chunks; returns the budget left."""
        budget = self.token_budget
        speculate = self._speculating()
        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            # drafts follow the last token, so only a request that is decoding can verify them;
            # they never take the one token each later running request needs to advance
            k = 0
            if speculate and n == 1:
                k = max(min(req.num_draft_tokens, budget - n - (len(self.running) - i - 1)), 0)
            new_block_ids = self.kv.allocate_slots(req, n + k)
            if new_block_ids is None and k:  # drop the drafts before preempting anyone
                k = 0
                new_block_ids = self.kv.allocate_slots(req, n)
            while new_block_ids is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.req_id)
                if victim is req:
                    break
                new_block_ids = self.kv.allocate_slots(req, n)
            if new_block_ids is None:
                break
            cached_reqs.append(CachedRequestData(req.req_id, new_block_ids, req.num_computed_tokens))
            num_scheduled[req.req_id] = n + k
            if k:
                num_drafts[req.req_id] = k
            budget -= n + k
            i += 1
        return budget

    def _admit_waiting(self, budget: int, num_scheduled: dict[str, int],
                       new_reqs: list[NewRequestData]) -> int:
        self.waiting.sort(key=Request.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            computed_blocks, num_computed = self.kv.get_computed_blocks(req)
            n = req.num_tokens - num_computed
            if n > budget and not self.chunked_prefill:
                break
            n = min(n, budget)
            block_ids = self.kv.allocate_slots(req, n, computed_blocks)
            if block_ids is None:
                break
            self.waiting.pop(0)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_computed
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_computed
            self.running.append(req)
            new_reqs.append(NewRequestData(req.req_id, req.prompt_token_ids, list(req.output_token_ids),
                                           req.params, block_ids, num_computed))
            num_scheduled[req.req_id] = n
            budget -= n
        return budget

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_draft_tokens = 0  # the runner drops its state, drafts included
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    # ---- results -------------------------------------------------------------------------

    def update_from_output(self, sched_out: SchedulerOutput,
                           runner_out: ModelRunnerOutput) -> list[tuple[Request, list[int]]]:
        """Append sampled tokens, finish requests on token-level stops; returns (request, new tokens)
        for every request that produced tokens this step."""
        results = []
        for req_id in sched_out.num_scheduled_tokens:
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            sampled = runner_out.sampled_token_ids.get(req_id) or []
            k = sched_out.num_draft_tokens.get(req_id, 0)
            if k:  # a verification: the accepted drafts, then the bonus token
                accepted = len(sampled) - 1
                req.num_computed_tokens -= k - accepted
                self.kv.trim(req, req.num_computed_tokens)
                self.spec_stats.observe(k, accepted)
                self.last_stats.spec.observe(k, accepted)
            req.num_draft_tokens = runner_out.num_draft_tokens.get(req_id, 0)
            new_tokens = req.append_output(sampled) if sampled else []
            # a stop inside the accepted drafts leaves computed tokens past the last known one
            self.kv.cache_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            if req.status.finished:
                self._free(req)
            if new_tokens:
                results.append((req, new_tokens))
        return results

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> None:
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is None or req.status.finished:
                continue
            if req in self.waiting:
                self.waiting.remove(req)
            if req in self.running:
                self.running.remove(req)
            req.status = status
            self._free(req)

    def _free(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req)
        self._finished_ids.add(req.req_id)
        del self.requests[req.req_id]

    def get_request(self, req_id: str) -> Optional[Request]:
        return self.requests.get(req_id)

    def check_integrity(self) -> None:
        """Between steps: block ref counts are exact, waiting requests hold nothing, and each
        running request holds exactly the blocks of its computed tokens (none for drafts)."""
        live = {r.req_id for r in self.running}
        self.kv.check_integrity(live)
        for req in self.waiting:
            if self.kv.req_blocks.get(req.req_id):
                raise AssertionError(f"waiting request {req.req_id} holds blocks")
        for req in self.running:
            held = len(self.kv.req_blocks.get(req.req_id, []))
            if held != self.kv.blocks_needed(req.num_computed_tokens):
                raise AssertionError(f"running request {req.req_id} holds {held} blocks for "
                                     f"{req.num_computed_tokens} computed tokens")
            if req.num_computed_tokens > req.num_tokens:
                raise AssertionError(f"request {req.req_id} computed past its known tokens")
