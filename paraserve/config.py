"""Engine configuration: frozen dataclasses, validated once, composed in EngineConfig.

Defaults live here only; the CLI builds its flags from these fields (and their `help`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-facing configuration problem: one line saying what is wrong and what to do."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    model: Optional[str] = _f(None, "HF checkpoint directory or .gguf file; default: embedded SmolLM2-135M-Instruct")
    tokenizer: Optional[str] = _f(None, "tokenizer directory (default: the model's)")
    dtype: str = _f("auto", "weights and activations dtype", choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: Optional[int] = _f(None, "context length (default: the model's max positions)")
    seed: int = _f(0, "seed for requests without their own seed")
    served_model_name: Optional[str] = _f(None, "model name reported by the API")

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _f(16, "tokens per KV cache block")
    kv_cache_memory: Optional[str] = _f(None, "KV cache budget, e.g. 2GiB or 512MiB (default: a share of free memory)")
    num_gpu_blocks_override: Optional[int] = _f(None, "force the number of KV blocks (testing)")
    enable_prefix_caching: bool = _f(True, "reuse KV blocks of shared prompt prefixes")
    kv_cache_dtype: str = _f("auto", "KV cache dtype", choices=("auto",))

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be >= 1")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _f(64, "max requests running in one step")
    max_num_batched_tokens: int = _f(2048, "token budget of one step (prefill chunks + decodes)")
    enable_chunked_prefill: bool = _f(True, "split long prompts across steps")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = _f(1, "tensor parallel ranks")

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ConfigError("--tensor-parallel-size > 1 is not supported yet")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = _f("auto", "cpu, cuda or auto")
    threads: Optional[int] = _f(None, "torch threads (default: all cores)")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    max_queue: int = 256  # requests waiting beyond the running batch before 429
    graceful_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat vLLM-style engine args (dtype=..., max_num_seqs=...)."""
        parts = {}
        for part in dataclasses.fields(cls):
            sub_cls = part.default_factory  # type: ignore[misc]
            names = {f.name for f in dataclasses.fields(sub_cls)}
            parts[part.name] = sub_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise ConfigError(f"unknown engine argument(s): {', '.join(sorted(kwargs))}")
        return cls(**parts)

    def replace(self, **kwargs: Any) -> "EngineConfig":
        flat = {f.name: getattr(sub, f.name) for sub in self.parts() for f in dataclasses.fields(sub)}
        flat.update(kwargs)
        return EngineConfig.from_kwargs(**flat)

    def parts(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def engine_fields() -> list[dataclasses.Field]:
    """Every flat engine argument, in order, for the CLI."""
    out = []
    for part in dataclasses.fields(EngineConfig):
        out.extend(dataclasses.fields(part.default_factory))  # type: ignore[arg-type]
    return out


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ConfigError(f"cannot read memory size {text!r}: use a number with a unit, e.g. 2GiB or 512MiB")
    return int(value * _UNITS[unit])
