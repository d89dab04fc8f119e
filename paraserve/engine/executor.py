"""Executors: the engine's handle on its workers, one per rank. The scheduler stays in the engine;
each step's SchedulerOutput (deltas only) goes to every rank and rank 0's ModelRunnerOutput comes
back (the model runners agree on tokens by broadcast, see worker/model_runner.py).

- InProcExecutor: one rank, the Worker in the engine's own process (the default at world size 1).
- MultiprocExecutor (`mp`): a process per rank on this host; pipes to the driver, gloo or NCCL
  between ranks, rendezvous through a TCPStore the driver opens on a port the OS picks.
- RayExecutor (`ray`, ray_executor.py): the same workers as Ray actors, on one host or many.

A worker that dies is noticed at once (its process sentinel or closed pipe wakes the driver's
wait), and also while the engine is idle (check_health): the executor then stops every other
worker and raises WorkerDiedError, now and on every later call.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import signal
import sys
import time
import types
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any, Iterator, Optional

from paraserve.config import EngineConfig
from paraserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from paraserve.models.loader import ModelSource

logger = logging.getLogger("paraserve")


# how long a rank's failure waits for a peer's death to show, the likelier cause (MultiprocExecutor,
# RayExecutor)
PEER_DEATH_WAIT_S = 2.0


class WorkerDiedError(RuntimeError):
    """A worker process died or failed: the engine cannot run steps any more."""


class Executor(ABC):
    world_size: int = 1
    worker_info: list[dict]  # per rank, what Worker.info() reported (dtype, device, pid, threads)

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call Worker.<method>(*args) on every rank; their results in rank order."""

    @abstractmethod
    def execute_model(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's output."""

    def check_health(self) -> None:
        """Raise WorkerDiedError when a worker is gone (cheap; called while the engine idles)."""

    def shutdown(self) -> None:
        """Stop every worker; idempotent."""


def make_executor(config: EngineConfig, source: ModelSource, hf_config,
                  max_model_len: int) -> Executor:
    backend = config.parallel.executor_backend
    if backend is None:
        return InProcExecutor(config, source, hf_config, max_model_len)
    config = resolve_for_workers(config)
    if backend == "mp":
        return MultiprocExecutor(config, source, hf_config, max_model_len)
    from paraserve.engine.ray_executor import RayExecutor

    return RayExecutor(config, source, hf_config, max_model_len)


def resolve_for_workers(config: EngineConfig) -> EngineConfig:
    """Device and dtype decided once, in the driver, and handed to every rank."""
    from paraserve.worker.worker import resolve_device, resolve_dtype

    device = resolve_device(config.device.device)
    dtype = resolve_dtype(config.model.dtype, device)
    return config.replace(device=device.type, dtype=str(dtype).removeprefix("torch."))


def dist_backend(config: EngineConfig) -> str:
    return "nccl" if config.device.device.startswith("cuda") else "gloo"


# ---- one rank, in process ----------------------------------------------------------------------

class InProcExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource, hf_config, max_model_len: int) -> None:
        from paraserve.worker.worker import Worker

        self.worker = Worker(config, source, hf_config, max_model_len)
        self.worker_info = [self.worker.info()]

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(sched_out)


# ---- a process per rank ------------------------------------------------------------------------

def start_method() -> str:
    """forkserver where there is one (Linux): a clean helper process imports torch once and
    forks each worker from it in milliseconds. Forking the driver itself is unsafe (its OpenMP
    pool, its threads, CUDA). Measured here (2 cores, two workers of a tiny model): forkserver
    3.4 s for a process's first engine, 0.2 s for later ones; spawn 8 s every time."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


# imported once by the forkserver, so each forked worker starts with them: torch, our models, and
# the transformers config classes a worker unpickles (~1.5 s each to import on these machines)
_PRELOAD = ["paraserve.worker.worker_proc", "paraserve.worker.worker", "paraserve.models.llama",
            "paraserve.models.moe_models"] + [
    f"transformers.models.{m}.configuration_{m}"
    for m in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")]


@dataclass
class _Proc:
    rank: int
    process: Any  # multiprocessing.Process
    conn: Any  # the driver's end of the pipe

    def describe_exit(self) -> str:
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource, hf_config, max_model_len: int) -> None:
        import torch.distributed as dist

        from paraserve.worker.worker_proc import WorkerSpec, worker_main

        self.world_size = config.parallel.world_size
        self.dead: Optional[WorkerDiedError] = None
        self._closed = False
        # the rendezvous: port 0 lets the OS pick a free one, held open for the engine's lifetime
        self._store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        method = start_method()
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD + [type(hf_config).__module__])
        t0 = time.monotonic()
        self.procs: list[_Proc] = []
        for rank in range(self.world_size):
            spec = WorkerSpec(config, source, hf_config, max_model_len, rank, self.world_size, rank,
                              self.world_size, "127.0.0.1", self._store.port, dist_backend(config))
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(spec, child_end), daemon=True,
                               name=f"paraserve-worker-{rank}")
            with _main_module_hidden():
                proc.start()
            child_end.close()
            self.procs.append(_Proc(rank, proc, parent_end))
        # stops the workers if the engine is dropped or the interpreter exits without shutdown()
        self._finalizer = weakref.finalize(self, _stop_processes, [p.process for p in self.procs], 0.0)
        try:
            self.worker_info = self._gather(range(self.world_size))
        except WorkerDiedError as e:
            # a rank that failed to start (e.g. a ConfigError) raises its own error, not ours
            raise (e.__cause__ if isinstance(e.__cause__, Exception) else e) from None
        logger.info("started %d worker processes (%s, %s) in %.1f s: pids %s", self.world_size,
                    method, dist_backend(config), time.monotonic() - t0,
                    [i["pid"] for i in self.worker_info])

    # ---- calls -------------------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        self._send(method, args, everyone=True)
        return self._gather(range(self.world_size))

    def execute_model(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        self._send("execute_model", (sched_out,), everyone=False)
        return self._gather([0])[0]

    def check_health(self) -> None:
        if self.dead is not None:
            raise self.dead
        if self._closed:
            return
        for p in self.procs:
            if p.process.exitcode is not None:
                self._fail(f"worker rank {p.rank} (pid {p.process.pid}) {p.describe_exit()}")

    def _send(self, method: str, args: tuple, everyone: bool) -> None:
        if self.dead is not None:
            raise self.dead
        if self._closed:
            raise RuntimeError("the engine's worker processes were shut down (engine.shutdown())")
        payload = pickle.dumps((method, args, everyone), protocol=pickle.HIGHEST_PROTOCOL)
        for p in self.procs:
            try:
                p.conn.send_bytes(payload)
            except OSError:
                self._fail(f"worker rank {p.rank} (pid {p.process.pid}) {p.describe_exit()}")

    def _gather(self, ranks) -> list[Any]:
        """Wait for the replies of `ranks`, watching every worker: an error reply, a closed pipe
        or an exited process from any rank fails the executor."""
        want = set(ranks)
        results: dict[int, Any] = {}
        by_handle = {}
        for p in self.procs:
            by_handle[p.conn] = p
            by_handle[p.process.sentinel] = p
        while want - results.keys():
            for handle in wait_ready(list(by_handle)):
                p = by_handle[handle]
                if handle is p.process.sentinel:
                    if p.conn.poll():  # its last words first (an error it sent before exiting)
                        continue
                    self._fail(f"worker rank {p.rank} (pid {p.process.pid}) {p.describe_exit()}")
                try:
                    status, payload = p.conn.recv()
                except (EOFError, OSError):
                    self._fail(f"worker rank {p.rank} (pid {p.process.pid}) {p.describe_exit()}")
                if status == "error":
                    exc, text = payload
                    logger.error("worker rank %d failed:\n%s", p.rank, text)
                    gone = self._exited_peer(p)
                    if gone is not None:  # the cause: its death broke p's collective
                        self._fail(f"worker rank {gone.rank} (pid {gone.process.pid}) {gone.describe_exit()}", exc)
                    self._fail(f"worker rank {p.rank} failed: {type(exc).__name__}: {exc}", exc)
                results[p.rank] = payload
        return [results[r] for r in sorted(want)]

    def _exited_peer(self, failed: _Proc) -> Optional[_Proc]:
        """Another rank whose process has exited, waiting up to PEER_DEATH_WAIT_S for one. When a
        worker dies, its peers' collectives fail on the closed connections (gloo: "Connection
        reset by peer"), sometimes before the driver sees the death: that rank, not the peer's
        error, is the cause to report (as RayExecutor does)."""
        others = [q for q in self.procs if q is not failed]
        deadline = time.monotonic() + PEER_DEATH_WAIT_S
        while True:
            gone = next((q for q in others if q.process.exitcode is not None), None)
            left = deadline - time.monotonic()
            if gone is not None or left <= 0 or not others:
                return gone
            wait_ready([q.process.sentinel for q in others], timeout=left)

    def _fail(self, reason: str, cause: Optional[BaseException] = None) -> None:
        """A worker is gone or broken: stop the others (they may be stuck in a collective with
        it), remember why, raise."""
        if self.dead is None:
            self.dead = WorkerDiedError(f"{reason}; the engine stopped its {self.world_size} "
                                        "worker processes and cannot run more requests")
            self.dead.__cause__ = cause
            logger.error("%s", self.dead)
            self._closed = True
            self._finalizer()  # terminate (SIGTERM, then SIGKILL) without a graceful wait
            self._close_pipes()
        raise self.dead

    # ---- shutdown ----------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        payload = pickle.dumps(("shutdown", (), False))
        for p in self.procs:
            try:
                p.conn.send_bytes(payload)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.process.join(max(0.0, deadline - time.monotonic()))
        self._finalizer()  # whoever did not exit in time
        self._close_pipes()

    def _close_pipes(self) -> None:
        for p in self.procs:
            p.conn.close()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without re-importing the caller's __main__ in it, as forkserver and spawn
    otherwise do: a worker needs only paraserve, and a script that builds an LLM at top level
    (no `if __name__ == "__main__"` guard), or one read from stdin, would break it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _stop_processes(processes: list, grace: float) -> None:
    """SIGTERM every live process, wait a moment, SIGKILL the rest, reap them all."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + max(grace, 2.0)
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
