"""/v1/completions and /v1/chat/completions: requests to engine calls, outputs to OpenAI JSON."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from paraserve.core.outputs import CompletionOutput, RequestOutput
from paraserve.engine.async_engine import AsyncLLM, EngineDeadError
from paraserve.server.errors import APIError, error_body
from paraserve.server.metrics import Metrics
from paraserve.server.protocol import ChatCompletionRequest, CompletionRequest
from paraserve.sampling_params import SamplingParams


@dataclass
class Job:
    """One prompt of a request: its token ids, params and timing."""
    index: int
    request_id: str
    prompt_text: Optional[str]
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    sent_tokens: dict[int, int] = field(default_factory=dict)  # choice index -> tokens streamed


class Serving:
    def __init__(self, engine: AsyncLLM, metrics: Metrics, model_name: str, max_pending: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_pending = max_pending

    # ---- shared ----------------------------------------------------------------------------

    def check_request(self, model: Optional[str], num_new: int) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model")
        if self.engine.dead is not None:
            raise APIError(503, "the engine has stopped; the server cannot take requests", retry_after=5)
        if self.engine.num_unfinished + num_new > self.max_pending:
            raise APIError(429, f"the server is at capacity ({self.max_pending} requests in flight): "
                                "retry later", retry_after=1)

    def make_job(self, index: int, base_id: str, prompt_text: Optional[str], ids: list[int],
                 params: SamplingParams, explicit_max: Optional[int]) -> Job:
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        vocab = self.engine.engine.hf_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        room = self.max_model_len - len(ids)
        want = explicit_max if explicit_max is not None else 1
        if room < want:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, "
                                f"but {len(ids)} prompt tokens + {want} max_tokens were requested",
                           "max_tokens" if explicit_max else "prompt")
        for tid in list(params.logit_bias or {}) + list(params.stop_token_ids or []):
            if not 0 <= tid < vocab:
                raise APIError(400, f"token id {tid} is outside the vocabulary [0, {vocab})", "logit_bias")
        return Job(index, f"{base_id}-{index}", prompt_text, ids, params)

    async def run_jobs(self, jobs: list[Job]) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """All jobs' outputs as they come, interleaved."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: Job) -> None:
            try:
                async for out in self.engine.generate({"prompt_token_ids": job.prompt_ids},
                                                      job.params, job.request_id):
                    if job.first_token is None and any(o.token_ids for o in out.outputs):
                        job.first_token = time.monotonic()
                    await queue.put((job, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((job, e))
            finally:
                await queue.put((job, None))

        tasks = [asyncio.create_task(pump(j)) for j in jobs]
        remaining = len(jobs)
        done: set[int] = set()
        try:
            while remaining:
                job, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise _as_api_error(item)
                else:
                    if item.finished:
                        done.add(job.index)
                        self._observe(job, item)
                    yield job, item
        finally:
            for job in jobs:
                if job.index not in done:  # client gone or request failed: it was aborted
                    self.metrics.success.labels(self.model_name, "abort").inc(job.params.n)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, job: Job, out: RequestOutput) -> None:
        now = time.monotonic()
        ttft = None if job.first_token is None else job.first_token - job.arrival
        n_out = sum(len(o.token_ids) for o in out.outputs)
        self.metrics.observe_request(len(job.prompt_ids), n_out, ttft, now - job.arrival,
                                     [o.finish_reason or "abort" for o in out.outputs])

    async def collect(self, jobs: list[Job]) -> dict[int, RequestOutput]:
        final: dict[int, RequestOutput] = {}
        async for job, out in self.run_jobs(jobs):
            if out.finished:
                final[job.index] = out
        return final

    # ---- completions -----------------------------------------------------------------------

    def completion_jobs(self, req: CompletionRequest, base_id: str) -> list[Job]:
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "the prompt is empty", "prompt")
        best_of = req.best_of or req.n
        if best_of < req.n:
            raise APIError(400, "best_of must be >= n", "best_of")
        if req.stream and best_of > req.n:
            raise APIError(400, "best_of > n cannot be streamed", "best_of")
        logprobs = req.logprobs if req.logprobs is not None else (0 if best_of > req.n else None)
        jobs = []
        for i, p in enumerate(prompts):
            text, ids = (p, self.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p))
            params = req.sampling_params(req.max_tokens, logprobs,
                                         prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
            params.n = best_of
            jobs.append(self.make_job(i, base_id, text, ids, params, req.max_tokens))
        self.check_request(req.model, len(jobs))
        return jobs

    def completion_choices(self, req: CompletionRequest, job: Job, out: RequestOutput) -> list[dict]:
        outs = out.outputs
        if len(outs) > req.n:  # best_of: keep the n most likely samples
            outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[:req.n]
        choices = []
        for rank, o in enumerate(outs):
            text = o.text
            if req.echo:
                text = (job.prompt_text if job.prompt_text is not None
                        else self.tokenizer.decode(job.prompt_ids)) + text
            lp = self._completion_logprobs(o, out if req.echo else None) if req.logprobs is not None else None
            choices.append({"index": job.index * req.n + rank, "text": text, "logprobs": lp,
                            "finish_reason": _reason(o), "stop_reason": o.stop_reason})
        return choices

    def _completion_logprobs(self, o: CompletionOutput, echo_of: Optional[RequestOutput],
                             start: int = 0) -> dict:
        tokens, token_lps, tops = [], [], []
        entries = []
        if echo_of is not None and echo_of.prompt_logprobs is not None:
            for tid, entry in zip(echo_of.prompt_token_ids, echo_of.prompt_logprobs):
                entries.append((tid, entry))
        entries += list(zip(o.token_ids[start:], (o.logprobs or [])[start:]))
        offsets, pos = [], 0
        for tid, entry in entries:
            tok = self._tok_text(tid, entry)
            tokens.append(tok)
            offsets.append(pos)
            pos += len(tok)
            token_lps.append(None if entry is None else entry[tid].logprob)
            # vLLM's shape: the chosen token plus the top-k, keyed by text
            tops.append(None if entry is None else {lp.decoded_token: lp.logprob for lp in entry.values()})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _tok_text(self, tid: int, entry) -> str:
        if entry is not None and tid in entry and entry[tid].decoded_token is not None:
            return entry[tid].decoded_token
        return self.tokenizer.convert_tokens_to_string(self.tokenizer.convert_ids_to_tokens([tid]))

    async def completion(self, req: CompletionRequest) -> dict:
        base_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = self.completion_jobs(req, base_id)
        final = await self.collect(jobs)
        choices = [c for j in jobs for c in self.completion_choices(req, j, final[j.index])]
        return {"id": base_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _usage(jobs, final)}

    async def completion_stream(self, req: CompletionRequest, jobs: list[Job], base_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        final: dict[int, RequestOutput] = {}
        try:
            async for job, out in self.run_jobs(jobs):
                for o in out.outputs:
                    sent = job.sent_tokens.get(o.index, 0)
                    delta = o.delta_text
                    if not delta and len(o.token_ids) == sent and o.finish_reason is None:
                        continue
                    lp = (self._completion_logprobs(o, None, start=sent)
                          if req.logprobs is not None else None)
                    job.sent_tokens[o.index] = len(o.token_ids)
                    choice = {"index": job.index * req.n + o.index, "text": delta, "logprobs": lp,
                              "finish_reason": _reason(o) if o.finish_reason else None}
                    yield _sse({"id": base_id, "object": "text_completion", "created": created,
                                "model": self.model_name, "choices": [choice]})
                if out.finished:
                    final[job.index] = out
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({"id": base_id, "object": "text_completion", "created": created,
                            "model": self.model_name, "choices": [], "usage": _usage(jobs, final)})
        except APIError as e:
            yield _sse(error_body(e.status, e.message, e.param))
        yield "data: [DONE]\n\n"

    # ---- chat ------------------------------------------------------------------------------

    def chat_job(self, req: ChatCompletionRequest, base_id: str) -> Job:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=True,
                return_dict=False, **(req.chat_template_kwargs or {}))
        except Exception as e:  # a template error is the request's fault
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        params = req.sampling_params(max_tokens, (top or 0) if req.logprobs else None)
        job = self.make_job(0, base_id, None, ids, params, max_tokens)
        self.check_request(req.model, 1)
        return job

    def _chat_logprobs(self, o: CompletionOutput, k: int, start: int = 0) -> dict:
        content = []
        for tid, entry in zip(o.token_ids[start:], (o.logprobs or [])[start:]):
            tok = self._tok_text(tid, entry)
            tops = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= k),
                          key=lambda lp: lp.rank)
            content.append({"token": tok, "logprob": entry[tid].logprob, "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob,
                                              "bytes": list((lp.decoded_token or "").encode())}
                                             for lp in tops]})
        return {"content": content}

    async def chat(self, req: ChatCompletionRequest) -> dict:
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        job = self.chat_job(req, base_id)
        out = (await self.collect([job]))[0]
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": self._chat_logprobs(o, req.top_logprobs or 0) if req.logprobs else None,
                    "finish_reason": _reason(o), "stop_reason": o.stop_reason} for o in out.outputs]
        return {"id": base_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _usage([job], {0: out})}

    async def chat_stream(self, req: ChatCompletionRequest, job: Job, base_id: str) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({"id": base_id, "object": "chat.completion.chunk", "created": created,
                         "model": self.model_name, "choices": choices, **extra})

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)])
        final = None
        try:
            async for _, out in self.run_jobs([job]):
                for o in out.outputs:
                    sent = job.sent_tokens.get(o.index, 0)
                    if o.delta_text or len(o.token_ids) > sent:
                        lp = self._chat_logprobs(o, req.top_logprobs or 0, start=sent) if req.logprobs else None
                        job.sent_tokens[o.index] = len(o.token_ids)
                        if o.delta_text or lp:
                            yield chunk([{"index": o.index, "delta": {"content": o.delta_text},
                                          "logprobs": lp, "finish_reason": None}])
                    if o.finish_reason and job.sent_tokens.get(-1 - o.index) is None:
                        job.sent_tokens[-1 - o.index] = 1
                        yield chunk([{"index": o.index, "delta": {}, "logprobs": None,
                                      "finish_reason": _reason(o), "stop_reason": o.stop_reason}])
                if out.finished:
                    final = out
            if req.stream_options and req.stream_options.include_usage and final is not None:
                yield chunk([], usage=_usage([job], {0: final}))
        except APIError as e:
            yield _sse(error_body(e.status, e.message, e.param))
        yield "data: [DONE]\n\n"


def _reason(o: CompletionOutput) -> Optional[str]:
    return "length" if o.finish_reason == "length" else ("stop" if o.finish_reason == "stop" else o.finish_reason)


def _usage(jobs: list[Job], final: dict[int, RequestOutput]) -> dict:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(o.token_ids) for out in final.values() for o in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), retry_after=5)
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return e
