"""Where a decode step's time goes: `paraserve bench spec --step-breakdown`.

Wraps, on one in-process engine's objects (never their classes), the calls a step makes in
turn, and adds up their wall time over the steps the caller keeps (decode steps: the bench
drops the ones that run a prefill):

    preparation   ModelRunner._prepare: the step's inputs and metadata, trees packed
    forward       the decoder: the C++ decode stack, or the model's modules where it does not run
    lm_head       the model's compute_logits: every sampled row and tree node
    sampling      ModelRunner._sample: plain decoding's token choice
    verification  ModelRunner._verify: the tree walk, K/V moves of accepted nodes
    drafting      ModelRunner._propose: the next trees (search: the drafter's beam search in it)
    other         the rest of LLMEngine.step: scheduling, outputs, detokenizing

The wrappers cost two clock reads a call (a few microseconds a step). On a GPU each wrapped call
also waits for its kernels (torch.cuda.synchronize), so a phase holds its own work rather than
its launches."""
from __future__ import annotations

import collections
import functools
import time
from typing import Any, Callable, Optional

import torch

# phase -> (object path from the runner, attribute); "" is the runner itself
_WRAPPED = {
    "preparation": ("", "_prepare"),
    "forward": ("stack", "forward"),
    "forward_modules": ("model", "forward"),
    "lm_head": ("model", "compute_logits"),
    "sampling": ("", "_sample"),
    "verification": ("", "_verify"),
    "drafting": ("", "_propose"),
    "search": ("spec.proposer", "propose_tensors"),
}
PHASES = ("preparation", "forward", "lm_head", "sampling", "verification", "drafting", "other")


class StepTimer:
    """Installs its wrappers on construction; remove() takes them off again."""

    def __init__(self, engine: Any) -> None:
        runner = getattr(getattr(engine, "worker", None), "runner", None)
        if runner is None:
            raise ValueError("--step-breakdown needs the engine's worker in this process "
                             "(one rank, no --distributed-executor-backend)")
        self.engine = engine
        self._sync = torch.device(getattr(runner, "device", "cpu")).type == "cuda"
        self._current: dict[str, float] = collections.defaultdict(float)
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.steps = 0
        self._installed: list[tuple[Any, str]] = []
        for phase, (path, attr) in _WRAPPED.items():
            obj = _resolve(runner, path)
            if obj is not None and hasattr(obj, attr):
                setattr(obj, attr, self._timed(phase, getattr(obj, attr)))
                self._installed.append((obj, attr))

    def _timed(self, phase: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if self._sync:
                    torch.cuda.synchronize()
                return out
            finally:
                self._current[phase] += time.perf_counter() - t0
        return timed

    def step(self, keep: bool) -> list:
        """engine.step(), its phases added to the totals when keep."""
        self._current.clear()
        t0 = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - t0
        if keep:
            self.steps += 1
            self.totals["step"] += elapsed
            for phase, seconds in self._current.items():
                self.totals[phase] += seconds
        return outputs

    def remove(self) -> None:
        for obj, attr in self._installed:
            delattr(obj, attr)  # the instance attribute; the class's method shows again
        self._installed.clear()


def _resolve(obj: Any, path: str) -> Optional[Any]:
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name, None)
    return obj


def per_step_ms(totals: dict[str, float], steps: int) -> Optional[dict[str, float]]:
    """Milliseconds per kept step for each of PHASES, "search" (inside drafting) and "step"; the
    decoder's two paths count as one "forward". None when no step was kept."""
    if not steps:
        return None
    t = dict(totals)
    t["forward"] = t.get("forward", 0.0) + t.pop("forward_modules", 0.0)
    t["other"] = t.get("step", 0.0) - sum(t.get(p, 0.0) for p in PHASES if p != "other")
    return {p: 1e3 * t.get(p, 0.0) / steps for p in (*PHASES, "search", "step")}
