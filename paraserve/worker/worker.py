"""One worker per rank: picks the device and dtype, loads its shard of the model, owns its
shard of the KV cache, and runs the model runner.

In a one-process engine the Worker lives in the engine's process; with several ranks each runs in
its own process (worker_proc.py, or a Ray actor), after torch.distributed and the parallel groups
are initialised, and the executor calls its methods by name."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator

import torch

from paraserve.attention.backend import default_backend_name, get_backend
from paraserve.config import ConfigError, EngineConfig, load_expert_history, parse_bytes
from paraserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from paraserve.distributed import parallel_state
from paraserve.distributed.ring import RingStats
from paraserve.models.loader import ModelSource, iter_weights
from paraserve.models.registry import get_model_class
from paraserve.ops import memory
from paraserve.spec_decode.speculator import Speculator
from paraserve.worker.model_runner import ModelRunner

logger = logging.getLogger("paraserve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return _auto_cpu_dtype()
    if name == "float16" and device.type == "cpu":
        raise ConfigError("--dtype float16 is slow and lossy on CPU: use bfloat16 or float32")
    return _DTYPES[name]


def _auto_cpu_dtype() -> torch.dtype:
    """bfloat16 where the CPU computes in it natively (AVX-512 BF16, AMX, Arm BF16), else
    float32. Decided from the CPU's flags, not by timing: a timed probe picked float32 in about
    one start in five on a busy 2-core machine (its first bf16 GEMM ran 15x slow), so the same
    command served different numbers at half the speed. Measured: bf16 GEMMs run ~1.7x float32 on
    the AMD Zen 4 machines of FACTS.md and ~3.5x on Sapphire Rapids (AMX), and decode reads half
    the bytes; without native bf16 they are emulated and slower than float32."""
    from paraserve.ops.cpu import native_bf16

    best = torch.bfloat16 if native_bf16() else torch.float32
    logger.info("dtype auto: %s (%s)", str(best).removeprefix("torch."),
                "the CPU has native bf16" if best is torch.bfloat16 else "no native bf16 on this CPU")
    return best


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Worker:
    """local_rank / local_world_size: this rank among the ranks on its host (device index, share
    of the cores and of host memory)."""

    def __init__(self, config: EngineConfig, source: ModelSource, hf_config, max_model_len: int,
                 local_rank: int = 0, local_world_size: int = 1) -> None:
        self.config = config
        self.hf_config = hf_config
        self.local_world_size = local_world_size
        self.device = resolve_device(config.device.device)
        if self.device.type == "cuda" and self.device.index is None and local_world_size > 1:
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            cores = os.cpu_count() or 1
            torch.set_num_threads(config.device.threads or max(1, cores // local_world_size))
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        parallel_state.init_single_process()  # no-op when init_distributed built the groups
        torch.manual_seed(config.model.seed)
        t0 = time.monotonic()
        model_cls = get_model_class(hf_config)
        kw = {}
        if config.parallel.num_redundant_experts:
            kw["num_redundant_experts"] = config.parallel.num_redundant_experts
            if config.parallel.expert_load_history:  # the same file on every rank: the same placement
                kw["expert_load"] = load_expert_history(config.parallel.expert_load_history)
        with _default_dtype(self.dtype), self.device:
            model = model_cls(hf_config, get_backend(default_backend_name(self.device)), max_model_len, **kw)
        # lazy: safetensors slices, so each rank reads only the shard it keeps
        model.load_weights(iter_weights(source, lazy=parallel_state.get_layout().world_size > 1))
        for module in model.modules():  # kernel-specific weight layouts, once weights are final
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        self.model = model.eval()
        logger.info("loaded %s (%s, %s) in %.1f s", source.name, self.dtype_name, self.device,
                    time.monotonic() - t0)
        speculator = None
        if config.speculative is not None:
            speculator = Speculator(config.speculative, self.model, source.name, hf_config.vocab_size)
        self.runner = ModelRunner(self.model, hf_config.vocab_size, config.kv_block_tokens,
                                  self.device, config.model.seed, max_model_len, speculator,
                                  config.parallel.cp_local_size, config.model.enforce_eager)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def num_kv_blocks(self, max_model_len: int) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if cache.kv_cache_memory is not None:
            budget = parse_bytes(cache.kv_cache_memory)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:  # the ranks of one host share its memory
            budget = min(int(_available_ram() * 0.25), 4 << 30) // self.local_world_size
        per_block = self.kv_bytes_per_token() * cache.block_size
        # more than twice what max_num_seqs full-length sequences can hold is never used
        # (the second half keeps evicted prefixes cached)
        useful = 2 * self.config.scheduler.max_num_seqs * -(-max_model_len // self.config.kv_block_tokens)
        return max(min(budget // per_block, useful), 1)

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over every layer, for this rank's KV heads only."""
        elem = torch.finfo(self.dtype).bits // 8
        return sum(2 * a.num_kv_heads * a.head_dim * elem for a in self.model.attention_layers())

    def init_kv_cache(self, num_blocks: int) -> None:
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = self.model.layers[0].self_attn.num_kv_heads
        shape = (2, num_blocks, self.config.cache.block_size, kv_heads, head_dim)
        # one tensor, a contiguous view per layer: moving slots (speculative decoding's accepted
        # K/V) is then one indexing op over every layer
        self.kv_cache = memory.zeros((cfg.num_hidden_layers, *shape), self.dtype, self.device)
        self.runner.bind_kv_cache(self.kv_cache)

    def execute_model(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched_out)

    def info(self) -> dict:
        """What the engine reports about the workers (plain data)."""
        return {"dtype": self.dtype_name, "device": str(self.device), "pid": os.getpid(),
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None}

    def comm_stats(self, reset: bool = False) -> dict:
        """This rank's collectives since the last reset: {"calls": {...}, "bytes_sent": {...},
        "ring": the context-parallel ring's transfers, bytes and hidden fraction}."""
        stats, ring = parallel_state.get_comm_stats(), self.runner.ring_stats
        out = {"calls": dict(stats.calls), "bytes_sent": dict(stats.bytes_sent),
               "ring": {"calls": ring.calls, "transfers": ring.transfers, "bytes_sent": ring.bytes_sent,
                        "hidden_fraction": ring.hidden_fraction if ring.transfers else None}}
        if reset:
            stats.reset()
            self.runner.ring_stats = RingStats()  # each step's plan takes the runner's current one
        return out

    def ring_chunks(self) -> dict[str, int]:
        """Context parallel: prefill chunks run by ring attention so far, and how many of them
        had cached context (earlier chunks, prefix hits) riding the ring."""
        return dict(self.runner.ring_chunks)

    def expert_placement(self) -> dict[int, list[int]]:
        """MoE layer index -> the logical expert held in each physical slot, rank after rank
        (redundant replicas repeat an expert)."""
        get = getattr(self.model, "moe_layers", None)
        return {i: list(m.placement.physical_to_logical) for i, m in get().items()} if get else {}

    def expert_load(self) -> dict[int, list[int]]:
        """MoE layer index -> assignments its router made per expert since the last reset (every
        rank of a tp group routes the same tokens, so one rank's counts are the batch's)."""
        get = getattr(self.model, "expert_load", None)
        return {i: c.tolist() for i, c in get().items()} if get is not None else {}


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
