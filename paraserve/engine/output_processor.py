"""Turns sampled tokens into RequestOutputs: detokenization, stop strings, logprobs, n > 1."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from paraserve.core.outputs import (CompletionOutput, Logprob, ModelRunnerOutput, RequestOutput,
                                    TopLogprobs)
from paraserve.core.request import Request
from paraserve.engine.detokenizer import IncrementalDetokenizer
from paraserve.sampling_params import SamplingParams


@dataclass
class ChildState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None


@dataclass
class ParentState:
    """One user request; n > 1 runs as n child requests sharing the prompt."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[str, ChildState]
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
            params: SamplingParams, child_ids: list[str]) -> None:
        children = {}
        for i, cid in enumerate(child_ids):
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            child = ChildState(i, detok)
            if params.logprobs is not None:
                child.logprobs, child.cumulative_logprob = [], 0.0
            children[cid] = child
            self.child_to_parent[cid] = request_id
        self.parents[request_id] = ParentState(request_id, prompt, prompt_token_ids, params, children)

    def process_tokens(self, req: Request, new_tokens: list[int],
                       runner_out: ModelRunnerOutput) -> bool:
        """Returns True when a stop string ended the child (the caller finishes it)."""
        parent = self.parents[self.child_to_parent[req.req_id]]
        child = parent.children[req.req_id]
        if req.num_cached_tokens and not parent.num_cached_tokens:
            parent.num_cached_tokens = req.num_cached_tokens
        stop = None
        if child.detok.stop and len(new_tokens) > 1:
            # several tokens in one step (speculative decoding): a stop string may end before the
            # last, and the tokens after it are not output, as if they had not been generated
            for i, tok in enumerate(new_tokens):
                stop = child.detok.add_tokens([tok])
                if stop is not None:
                    new_tokens = new_tokens[:i + 1]
                    break
        else:
            stop = child.detok.add_tokens(new_tokens)
        child.token_ids.extend(new_tokens)
        for entry in runner_out.logprobs.get(req.req_id, [])[:len(new_tokens)]:
            self._add_logprobs(child, entry)
        if stop is not None:
            child.finish_reason, child.stop_reason = "stop", stop
            child.detok.finish()
            return True
        if req.status.finished:
            child.finish_reason, child.stop_reason = req.status.value, req.stop_reason
            child.detok.finish()
        return False

    def process_prompt_logprobs(self, runner_out: ModelRunnerOutput) -> None:
        for cid, entries in runner_out.prompt_logprobs.items():
            parent = self.parents.get(self.child_to_parent.get(cid, ""))
            if parent is None or parent.children[cid].index != 0:
                continue
            if parent.prompt_logprobs is None:
                parent.prompt_logprobs = []
            if len(parent.prompt_logprobs) >= len(parent.prompt_token_ids):
                continue  # recomputed after preemption: already have them
            for e in entries:
                parent.prompt_logprobs.append(None if e is None else self._logprob_dict(e))

    def finish_child(self, child_id: str, reason: str) -> None:
        parent = self.parents.get(self.child_to_parent.get(child_id, ""))
        if parent is not None and parent.children[child_id].finish_reason is None:
            parent.children[child_id].finish_reason = reason
            parent.children[child_id].detok.finish()

    def output(self, request_id: str) -> RequestOutput:
        p = self.parents[request_id]
        outs = [CompletionOutput(c.index, c.detok.output_text, list(c.token_ids), c.cumulative_logprob,
                                 c.logprobs, c.finish_reason, c.stop_reason, c.detok.get_delta())
                for c in sorted(p.children.values(), key=lambda c: c.index)]
        return RequestOutput(request_id, p.prompt, p.prompt_token_ids, p.prompt_logprobs, outs,
                             p.finished, p.num_cached_tokens)

    def remove(self, request_id: str) -> None:
        parent = self.parents.pop(request_id, None)
        for cid in parent.children if parent else ():
            self.child_to_parent.pop(cid, None)

    def _logprob_dict(self, entry: TopLogprobs) -> dict[int, Logprob]:
        ids, vals, rank = entry
        out = {ids[0]: Logprob(vals[0], rank, self._decode(ids[0]))}
        for r, (tid, val) in enumerate(zip(ids[1:], vals[1:]), start=1):
            out.setdefault(tid, Logprob(val, r, self._decode(tid)))
        return out

    def _add_logprobs(self, child: ChildState, entry: TopLogprobs) -> None:
        if child.logprobs is None:
            return
        child.logprobs.append(self._logprob_dict(entry))
        child.cumulative_logprob = (child.cumulative_logprob or 0.0) + entry[1][0]

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.convert_tokens_to_string(self.tokenizer.convert_ids_to_tokens([token_id]))
