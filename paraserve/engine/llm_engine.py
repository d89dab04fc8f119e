"""The step loop: scheduler decides, worker runs, output processor turns tokens into text."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Optional, Union

from paraserve.config import ConfigError, EngineConfig
from paraserve.core.outputs import RequestOutput
from paraserve.core.request import Request, RequestStatus
from paraserve.core.scheduler import Scheduler, SpecDecodingStats
from paraserve.engine.executor import make_executor
from paraserve.engine.output_processor import OutputProcessor
from paraserve.models.loader import load_hf_config, load_tokenizer, resolve_model
from paraserve.models.registry import check_parallel
from paraserve.sampling_params import SamplingParams

logger = logging.getLogger("paraserve")

PromptType = Union[str, dict, list[int]]


class PromptTooLongError(ValueError):
    pass


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source = resolve_model(config.model.model)
        self.hf_config = load_hf_config(self.source)
        # a layout the model cannot take fails here, in one line, before any worker starts
        check_parallel(self.hf_config, config.parallel.layout(), config.parallel.num_redundant_experts)
        self.tokenizer = load_tokenizer(self.source)
        self.max_model_len = self._max_model_len()
        self.model_name = config.model.served_model_name or self.source.name
        self.executor = make_executor(config, self.source, self.hf_config, self.max_model_len)
        try:
            num_blocks = self._init_kv_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        # the in-process Worker (None when workers run in their own processes)
        self.worker = getattr(self.executor, "worker", None)
        block_size = config.kv_block_tokens  # with CP a block spans the CP ranks
        self.scheduler = Scheduler(config.scheduler, dataclasses.replace(config.cache, block_size=block_size),
                                   num_blocks, self.max_model_len, config.speculative)
        if config.speculative is not None:
            spec = config.speculative
            logger.info("speculative decoding: %s, up to %d draft tokens per path%s; off while more "
                        "than %d requests run", spec.method, spec.num_speculative_tokens,
                        f", {spec.beam_width} beams" if spec.method == "redrafter" else "",
                        spec.disable_by_batch_size)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_id = self._eos_token_id()
        self._pending_siblings: dict[str, list[Request]] = {}
        self._ids = itertools.count()
        self.capacity_tokens = num_blocks * block_size
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f sequences of %d tokens)",
                    num_blocks, block_size, self.capacity_tokens,
                    self.capacity_tokens / self.max_model_len, self.max_model_len)

    def _init_kv_cache(self) -> int:
        # every rank must hold the same block ids: the smallest cache any rank can afford
        num_blocks = min(self.executor.collective_rpc("num_kv_blocks", self.max_model_len))
        block_size = self.config.kv_block_tokens
        if num_blocks * block_size < self.max_model_len and self.config.cache.num_gpu_blocks_override is None:
            raise ConfigError(
                f"the KV cache holds {num_blocks * block_size} tokens, fewer than --max-model-len "
                f"{self.max_model_len}: raise --kv-cache-memory or lower --max-model-len")
        self.executor.collective_rpc("init_kv_cache", num_blocks)
        return num_blocks

    def _max_model_len(self) -> int:
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        asked = self.config.model.max_model_len
        if asked is not None and asked > model_max:
            raise ConfigError(f"--max-model-len {asked} exceeds the model's maximum of {model_max} positions")
        return asked or model_max

    def _eos_token_id(self) -> Optional[int]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) else eos
        return eos

    # ---- requests ----------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenize_prompt(prompt["prompt"])
        elif isinstance(prompt, list):
            ids = list(prompt)
        else:
            raise ValueError("a prompt is a string or {'prompt_token_ids': [...]}")
        vocab = self.hf_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return None, ids

    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Optional[SamplingParams] = None) -> str:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context is {self.max_model_len} "
                "(--max-model-len): shorten the prompt or raise --max-model-len")
        params.eos_token_id = self.eos_token_id
        children = [params] if params.n == 1 else [params.clone_for_child(i) for i in range(params.n)]
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        reqs = [Request(cid, ids, p, self.max_model_len) for cid, p in zip(child_ids, children)]
        self.scheduler.add_request(reqs[0])
        if len(reqs) > 1:
            # siblings wait until the first child's prompt is in the prefix cache, then share it
            self._pending_siblings[child_ids[0]] = reqs[1:]
        self.outputs.add(request_id, text, ids, params, child_ids)
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            parent = self.outputs.parents.get(rid)
            if parent is None:
                continue
            for cid in parent.children:
                self._pending_siblings.pop(cid, None)
                self.scheduler.finish_requests([cid], RequestStatus.FINISHED_ABORTED)
                self.outputs.finish_child(cid, "abort")
            self.outputs.remove(rid)

    def spec_decoding_stats(self) -> SpecDecodingStats:
        """Cumulative speculative decoding counters (drafted, accepted, verifications), for
        benchmarks; acceptance_rate and mean_accepted_length derive from them."""
        return dataclasses.replace(self.scheduler.spec_stats)

    def expert_load(self) -> dict[int, list[int]]:
        """MoE layer -> tokens routed to each expert since start (empty for dense models)."""
        return self.executor.collective_rpc("expert_load")[0]

    def check_health(self) -> None:
        """Raise WorkerDiedError when a worker process is gone."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the workers (idempotent); the engine cannot run steps afterwards."""
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_siblings)

    # ---- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the current output of every request that advanced."""
        sched_out = self.scheduler.schedule()
        runner_out = self.executor.execute_model(sched_out)
        self.outputs.process_prompt_logprobs(runner_out)
        touched: dict[str, None] = {}
        for req, new_tokens in self.scheduler.update_from_output(sched_out, runner_out):
            if self.outputs.process_tokens(req, new_tokens, runner_out):
                self.scheduler.finish_requests([req.req_id], RequestStatus.FINISHED_STOPPED)
            touched[self.outputs.child_to_parent[req.req_id]] = None
            siblings = self._pending_siblings.pop(req.req_id, None)
            for sib in siblings or ():
                self.scheduler.add_request(sib)
        results = []
        for rid in touched:
            out = self.outputs.output(rid)
            results.append(out)
            if out.finished:
                self.outputs.remove(rid)
        return results
