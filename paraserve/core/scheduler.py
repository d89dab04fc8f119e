"""Token-budget scheduler: each step, computed tokens catch up with known tokens.

Running requests go first (decodes and unfinished prefill chunks), then waiting ones, all
within max_num_batched_tokens and max_num_seqs. When blocks run out the lowest-priority,
newest running request is preempted: its blocks are freed and it is recomputed later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from paraserve.config import CacheConfig, SchedulerConfig
from paraserve.core.kv_cache_manager import KVCacheManager
from paraserve.core.outputs import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                    SchedulerOutput)
from paraserve.core.request import Request, RequestStatus


@dataclass
class StepStats:
    num_running: int = 0
    num_waiting: int = 0
    num_scheduled_tokens: int = 0
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 max_model_len: int) -> None:
        self.max_num_seqs = sched.max_num_seqs
        self.token_budget = sched.max_num_batched_tokens
        self.chunked_prefill = sched.enable_chunked_prefill
        self.max_model_len = max_model_len
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
        budget = self.token_budget
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()

        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
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
            num_scheduled[req.req_id] = n
            budget -= n
            i += 1

        if not preempted:
            budget = self._admit_waiting(budget, num_scheduled, new_reqs)

        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        out = SchedulerOutput(
            new_requests=new_reqs, cached_requests=cached_reqs, num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_ids, preempted_req_ids=preempted)
        self._finished_ids = set()
        self.last_stats = StepStats(len(self.running), len(self.waiting),
                                    out.total_num_scheduled_tokens, len(preempted))
        return out

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
            self.kv.cache_blocks(req, req.num_computed_tokens)
            new_tokens = runner_out.sampled_token_ids.get(req_id) or []
            if not new_tokens:
                continue
            req.append_output(new_tokens)
            if req.check_stop():
                self._free(req)
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
        live = {r.req_id for r in self.running}
        self.kv.check_integrity(live)
        for req in self.waiting:
            if self.kv.req_blocks.get(req.req_id):
                raise AssertionError(f"waiting request {req.req_id} holds blocks")
