"""Run a function in N gloo processes on one host, on a loopback port chosen at run time."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    # bind to port 0 so the OS picks an unused one; tiny race until the store binds it again
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    # one thread: the cores are shared, and a forked child must not touch the parent's
    # OpenMP pool (torch runs single-threaded ops without entering OpenMP at all)
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the hostname may not resolve in a sandbox
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        # rank 0 hosts the store: a rank still tearing down when it exits was seen to abort
        # ("terminate called without an active exception"), so all finish together
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world_size: int, *args: Any,
             start_method: str = "spawn") -> None:
    """Call fn(rank, world_size, *args) in world_size processes; raises if any of them fails.

    spawn, not fork: a pytest process that has run engines holds threads (engine loops, OpenMP,
    executors), and a child forked while one of them held a lock hung forever in a fresh CI-like
    run (seen: both ranks parked on a futex inside torch). spawn costs ~1-3 s of imports per
    child; fn must be a module-level function.
    """
    if dist.is_initialized():
        raise RuntimeError("run_gloo needs a parent without a default process group")
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method=start_method)
