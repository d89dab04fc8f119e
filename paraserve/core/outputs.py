"""The only objects that cross boundaries: scheduler -> runner -> engine -> user."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from paraserve.sampling_params import SamplingParams

# ---- scheduler -> model runner (deltas only) -------------------------------------------------


@dataclass
class NewRequestData:
    """A request the runner has not seen (or that was preempted and is resumed from scratch)."""
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resumed after preemption (recompute)
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens computed this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # runner drops their state
    preempted_req_ids: set[str] = field(default_factory=set)
    # req_id -> draft tokens verified this step: the first 1 + k nodes of the tree the runner
    # proposed last step (its scheduled tokens are those 1 + k); absent: no drafts, and the
    # runner drops any it holds for the request
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    propose_drafts: bool = False  # speculation is on: propose drafts for the next step

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


# ---- model runner -> scheduler --------------------------------------------------------------

# top-N logprobs of one position: (token_ids, logprobs, rank of the chosen/actual token)
TopLogprobs = tuple[list[int], list[float], int]


@dataclass
class ModelRunnerOutput:
    # req_id -> tokens sampled this step (empty when the step was a non-final prefill chunk);
    # after a verification: the accepted drafts and the bonus token
    sampled_token_ids: dict[str, list[int]]
    # req_id -> draft tokens proposed for the next step (tree nodes after the root)
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    # req_id -> per sampled token: chosen token first, then the top-N
    logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)
    # req_id -> per prompt position computed this step (position 0 has none)
    prompt_logprobs: dict[str, list[Optional[TopLogprobs]]] = field(default_factory=dict)


# ---- engine -> user (vLLM's shapes) ---------------------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Optional[object] = None  # the stop string or token id that ended it
    delta_text: str = ""  # text new since this request's previous output (for streaming)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
