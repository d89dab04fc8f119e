"""A request as the scheduler sees it: token counts, not phases."""
from __future__ import annotations

import enum
import itertools
import time
from typing import Optional

from paraserve.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class Request:
    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_model_len: int, arrival_time: Optional[float] = None) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # draft tokens (tree nodes after the root) the runner proposed for the next step; they
        # are scheduled after the request's last token and are not part of num_tokens
        self.num_draft_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.stop_reason: Optional[object] = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self._order = next(_arrival_counter)  # ties in arrival_time keep submission order
        room = max_model_len - len(self.prompt_token_ids)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def sort_key(self) -> tuple[int, float, int]:
        """Lower runs first; the largest key is the first to be preempted."""
        return (self.params.priority, self.arrival_time, self._order)

    def append_output(self, token_ids: list[int]) -> list[int]:
        """Append tokens up to the first that stops the request (EOS, a stop token, max_tokens:
        a speculative step can bring several); returns the ones appended."""
        for i, tok in enumerate(token_ids):
            self.output_token_ids.append(tok)
            if self.check_stop():
                return token_ids[:i + 1]
        return token_ids

    def check_stop(self) -> bool:
        """Token-level stop conditions (stop strings are the detokenizer's job)."""
        if not self.output_token_ids:
            return False
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        params = self.params
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last == params.eos_token_id:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = None
                return True
            if last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if n_out >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
