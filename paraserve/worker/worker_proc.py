"""A rank's worker outside the engine's process: joins torch.distributed, builds the Worker, then
serves the executor's calls. `init_worker` is shared by the mp executor's processes and the Ray
executor's actors; `worker_main` is the mp process's whole life.

Calls arrive as pickled (method, args, everyone) over a pipe and run as `worker.<method>(*args)`.
Every rank answers when `everyone` is set; otherwise only rank 0 does (a step's output), and the
others write only to report an error. A worker exits when told to, when the driver's end of the
pipe closes, or (Linux) when the process that started it dies: no orphans.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from paraserve.config import EngineConfig
from paraserve.models.loader import ModelSource

logger = logging.getLogger("paraserve")

# a collective waits this long for a peer before failing; a dead peer fails it at once (its
# sockets close), so this only bounds a peer that hangs
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to start, as plain picklable data."""
    config: EngineConfig  # dtype and device already resolved by the driver (all ranks agree)
    source: ModelSource
    hf_config: Any
    max_model_len: int
    rank: int
    world_size: int
    local_rank: int  # among the ranks on this host
    local_world_size: int
    store_host: str  # the driver's TCPStore: the rendezvous, on a port the OS chose
    store_port: int
    backend: str  # "gloo" (CPU) or "nccl" (CUDA)


def init_worker(spec: WorkerSpec):
    """torch.distributed, the parallel groups, then this rank's Worker (model shard loaded)."""
    import torch.distributed as dist

    from paraserve.distributed import parallel_state
    from paraserve.worker.worker import Worker

    if spec.backend == "gloo" and spec.store_host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the hostname may not resolve
    store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False,
                          timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    par = spec.config.parallel
    parallel_state.init_distributed(par.tensor_parallel_size, par.expert_parallel_size,
                                    par.context_parallel_size,
                                    enable_expert_parallel=par.enable_expert_parallel)
    return Worker(spec.config, spec.source, spec.hf_config, spec.max_model_len,
                  spec.local_rank, spec.local_world_size)


def teardown() -> None:
    import torch.distributed as dist

    from paraserve.distributed import parallel_state

    try:
        parallel_state.destroy_parallel_state()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # peers may be gone already; we are exiting anyway
        pass


def worker_main(spec: WorkerSpec, conn) -> None:
    """The mp worker process: conn is its end of the pipe to the driver."""
    _die_with_parent()
    # Ctrl-C reaches the whole foreground process group; the driver decides when workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = init_worker(spec)
    except BaseException as e:
        _send_error(conn, e)
        teardown()
        return
    try:
        conn.send(("ok", worker.info()))
        _serve(worker, conn, spec.rank)
    except (EOFError, OSError):
        pass  # the driver went away mid-reply
    finally:
        teardown()


def _serve(worker, conn, rank: int) -> None:
    while True:
        try:
            method, args, everyone = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the driver is gone
        if method == "shutdown":
            return
        try:
            result = getattr(worker, method)(*args)
        except Exception as e:  # reported; the driver then shuts every worker down
            _send_error(conn, e)
            continue
        if everyone or rank == 0:
            conn.send(("ok", result))


def _send_error(conn, e: BaseException) -> None:
    text = "".join(traceback.format_exception(e)).rstrip()
    try:
        pickle.dumps(e)
        exc: BaseException = e
    except Exception:
        exc = RuntimeError(f"{type(e).__name__}: {e}")
    try:
        conn.send(("error", (exc, text)))
    except (OSError, EOFError):
        pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (the driver, or the forkserver that dies
    with the driver), even if the driver was SIGKILLed and ran no cleanup."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
