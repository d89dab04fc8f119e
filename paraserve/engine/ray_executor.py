"""The Ray executor: each rank's Worker in a Ray actor, so one engine can span hosts.

The engine's process is the driver (scheduler, tokenizer, HTTP); it joins the Ray cluster that
`RAY_ADDRESS` names (or that the caller's own `ray.init(...)` started), or starts a local one. The
actors are placed with one placement group (PACK: a host's ranks together) and run the same
`init_worker` as the mp executor's processes; they meet on the driver's TCPStore. When every
actor is on the driver's host the ranks talk over loopback, otherwise over the driver's address
(set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME through the cluster's environment where the default
interface is wrong).

Each actor also runs a `sentinel` call that never returns (the actor has two threads): its
reference fails the moment the actor dies, which is how a dead worker is noticed in a wait, or
while idle (check_health), as the mp executor's process sentinels are.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from paraserve.config import ConfigError, EngineConfig
from paraserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from paraserve.engine.executor import PEER_DEATH_WAIT_S, Executor, WorkerDiedError, dist_backend
from paraserve.models.loader import ModelSource

logger = logging.getLogger("paraserve")

PLACEMENT_TIMEOUT_S = 120.0


class RayWorker:
    """The actor body (wrapped by ray.remote at run time, so importing this module needs no Ray)."""

    def __init__(self) -> None:
        self.worker = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def start(self, spec) -> dict:
        from paraserve.worker.worker_proc import init_worker

        self.worker = init_worker(spec)
        return self.worker.info()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def execute_model(self, sched_out: SchedulerOutput, reply: bool) -> Optional[ModelRunnerOutput]:
        out = self.worker.execute_model(sched_out)
        return out if reply else None  # only rank 0's output travels back

    def sentinel(self) -> None:
        threading.Event().wait()

    def stop(self) -> None:
        from paraserve.worker.worker_proc import teardown

        teardown()


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource, hf_config, max_model_len: int) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise ConfigError("--distributed-executor-backend ray needs Ray: pip install 'ray==2.60.0' "
                              "(or use mp on one host)") from None
        import torch.distributed as dist

        from paraserve.worker.worker_proc import WorkerSpec

        self.ray = ray
        self.world_size = n = config.parallel.world_size
        self.dead: Optional[WorkerDiedError] = None
        self._closed = False
        t0 = time.monotonic()
        # a connection this engine opens (RAY_ADDRESS, or a local cluster it starts) it also closes
        # on shutdown, from the same thread: Ray's local processes die with the thread that
        # started them; one the caller opened stays theirs
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(include_dashboard=False, log_to_driver=False)
        gpu = config.device.device.startswith("cuda")
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        self._pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        self._remove_pg = remove_placement_group
        ready, _ = ray.wait([self._pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self._remove_pg(self._pg)
            if self._owns_ray:
                ray.shutdown()
            raise ConfigError(f"the Ray cluster cannot place {n} workers of {bundle} within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s (it has {ray.cluster_resources()})")
        actor_cls = ray.remote(RayWorker)
        self.actors = [actor_cls.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_concurrency=2,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
        ).remote() for i in range(n)]
        self._sentinels = [a.sentinel.remote() for a in self.actors]
        try:
            ips = self._get([a.node_ip.remote() for a in self.actors])
            driver_ip = ray.util.get_node_ip_address()
            one_host = all(ip == driver_ip for ip in ips)
            host = "127.0.0.1" if one_host else driver_ip
            self._store = dist.TCPStore(host, 0, None, True, wait_for_workers=False)
            local = [ips[:r].count(ips[r]) for r in range(n)]
            specs = [WorkerSpec(config, source, hf_config, max_model_len, r, n, local[r], ips.count(ips[r]),
                                host, self._store.port, dist_backend(config)) for r in range(n)]
            self.worker_info = self._get([a.start.remote(s) for a, s in zip(self.actors, specs)])
        except WorkerDiedError as e:
            raise (e.__cause__ if isinstance(e.__cause__, Exception) else e) from None
        logger.info("started %d Ray workers on %s in %.1f s", n, sorted(set(ips)), time.monotonic() - t0)

    # ---- calls -------------------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        self._check_alive()
        return self._get([a.call.remote(method, *args) for a in self.actors])

    def execute_model(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        self._check_alive()
        ref = self.ray.put(sched_out)  # serialised once for every actor
        return self._get([a.execute_model.remote(ref, r == 0) for r, a in enumerate(self.actors)])[0]

    def check_health(self) -> None:
        if self.dead is not None:
            raise self.dead
        if self._closed:
            return
        done, _ = self.ray.wait(self._sentinels, timeout=0)
        if done:
            self._fail(self._died(self._sentinels.index(done[0])))

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead
        if self._closed:
            raise RuntimeError("the engine's Ray workers were shut down (engine.shutdown())")

    def _get(self, refs: list) -> list[Any]:
        """Every rank's result (refs in rank order), or a failure as soon as any actor dies or
        any call raises."""
        pending = list(refs)
        while pending:
            ref = self.ray.wait(pending + self._sentinels, num_returns=1)[0][0]
            if ref in self._sentinels:
                self._fail(self._died(self._sentinels.index(ref)))
            pending.remove(ref)
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                self._fail(self._died(refs.index(ref)))
            except Exception as e:
                cause = _task_cause(e)
                # a rank whose peer died fails in its next collective (gloo: "Connection reset by
                # peer"), often before Ray reports the death: name the dead rank, the root cause
                done = self.ray.wait(self._sentinels, num_returns=1, timeout=PEER_DEATH_WAIT_S)[0]
                if done:
                    self._fail(self._died(self._sentinels.index(done[0])), cause)
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                self._fail(f"Ray worker rank {refs.index(ref)} failed: {type(cause).__name__}: {first}", cause)
        return self.ray.get(list(refs))

    def _died(self, rank: int) -> str:
        pid = self.worker_info[rank]["pid"] if getattr(self, "worker_info", None) else "?"
        return f"Ray worker rank {rank} (pid {pid}) died"

    def _fail(self, reason: str, cause: Optional[BaseException] = None) -> None:
        if self.dead is None:
            self.dead = WorkerDiedError(f"{reason}; the engine stopped its {self.world_size} Ray "
                                        "workers and cannot run more requests")
            self.dead.__cause__ = cause
            logger.error("%s", self.dead)
            self._kill()
        raise self.dead

    # ---- shutdown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._closed:
            return
        try:
            self.ray.wait([a.stop.remote() for a in self.actors], num_returns=len(self.actors), timeout=5)
        except Exception:
            pass
        self._kill()

    def _kill(self) -> None:
        if self._closed:
            return
        self._closed = True
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        try:
            self._remove_pg(self._pg)
        except Exception:
            pass
        if self._owns_ray:
            self.ray.shutdown()


def _task_cause(e: Optional[BaseException]) -> Optional[BaseException]:
    """The worker's own exception inside a RayTaskError, when there is one."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
