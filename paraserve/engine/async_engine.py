"""Drives LLMEngine from one background thread; each request gets its own asyncio stream.

The engine is touched only by its thread: callers post commands (add, abort) to a queue and
read outputs from per-request asyncio queues fed with call_soon_threadsafe. torch releases the
GIL in its kernels, so the event loop keeps serving HTTP while a step runs.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from paraserve.config import EngineConfig
from paraserve.core.outputs import RequestOutput
from paraserve.engine.llm_engine import LLMEngine, PromptType
from paraserve.sampling_params import SamplingParams

logger = logging.getLogger("paraserve")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class StepRecord:
    """What one engine step did, for metrics and the step log."""
    num_running: int
    num_waiting: int
    num_scheduled_tokens: int
    num_preemptions: int
    kv_usage: float
    duration_s: float
    num_drafts: int = 0  # speculative verifications this step
    num_draft_tokens: int = 0  # draft tokens verified
    num_accepted_tokens: int = 0  # of which accepted


class AsyncLLM:
    """config: the engine to build, in the engine thread (so that it is the only thread that
    runs OpenMP, see _run); engine: one built already (its OpenMP work may then share the cores
    with another thread's idle team, which makes every parallel region wake sleeping threads)."""

    def __init__(self, config: EngineConfig, engine: Optional[LLMEngine] = None) -> None:
        self._commands: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.dead: Optional[BaseException] = None
        self.step_listeners: list[Callable[[StepRecord, list[RequestOutput]], None]] = []
        self.max_running_seen = 0
        self.engine = engine
        built = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(config, built, failed),
                                        name="paraserve-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failed:
            raise failed[0]
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len

    # ---- public, called from the event loop ------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative output after every step it advances; aborts it when
        the consumer stops early (client disconnect, cancellation)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead}")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._commands.put(lambda: self._add(request_id, prompt, params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self.engine.abort_request([request_id]))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, which stops the workers (also on the server's SIGTERM path);
        if the thread does not finish in time, stop them from here."""
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.engine.shutdown()

    # ---- the engine thread -----------------------------------------------------------------

    def _add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as e:  # a bad request fails alone
            self._deliver(request_id, e)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            while True:
                cmd()
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _run(self, config: EngineConfig, built: threading.Event, failed: list) -> None:
        """The engine thread: build the engine here, then step it. OpenMP (libgomp) keeps a pool
        of threads per thread that starts parallel regions; with a second pool in the process
        (the main thread's, had it loaded the model) there are more OpenMP threads than cores,
        idle threads stop spinning almost at once, and every kernel call pays a futex wake-up:
        decode steps ran 2x slower than offline (23 vs 12 ms per token, SmolLM2 on 2 cores)."""
        try:
            if self.engine is None:
                self.engine = LLMEngine(config)
        except BaseException as e:  # a bad model or flag: raised in the caller's thread
            failed.append(e)
            return
        finally:
            built.set()
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if not self.engine.has_unfinished_requests():
                    # a worker that dies while nothing runs fails /health now, not at the next request
                    self.engine.check_health()
                    continue
                t0 = time.monotonic()
                outputs = self.engine.step()
                self._after_step(outputs, time.monotonic() - t0)
        except BaseException as e:  # the engine is broken: fail every request, clearly
            logger.exception("engine loop died")
            self.dead = e
            self._stop_workers()  # no worker outlives the engine
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, EngineDeadError(f"the engine failed: {e}"))
            return
        # asked to stop: from this thread, since what the engine started here (worker
        # processes, a local Ray cluster) may be tied to it and go when it ends
        self._stop_workers()

    def _stop_workers(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("stopping the workers failed")

    def _after_step(self, outputs: list[RequestOutput], duration: float) -> None:
        stats = self.engine.scheduler.last_stats
        self.max_running_seen = max(self.max_running_seen, stats.num_running)
        record = StepRecord(stats.num_running, stats.num_waiting, stats.num_scheduled_tokens,
                            stats.num_preemptions, self.engine.scheduler.kv.usage(), duration,
                            stats.spec.num_drafts, stats.spec.num_draft_tokens,
                            stats.spec.num_accepted_tokens)
        for listener in self.step_listeners:
            listener(record, outputs)
        for out in outputs:
            self._deliver(out.request_id, out)
