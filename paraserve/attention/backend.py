"""Attention backends: an ABC, per-step metadata, and a lazy registry.

A request's new tokens occupy consecutive cache slots after its computed ones. By default a
new token sees every earlier slot (causal); a request may instead carry an explicit boolean
mask over its new tokens (tree verification), while still seeing all of its computed context.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    num_reqs: int
    positions: torch.Tensor  # [T] rotary positions
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks]
    query_start_loc: list[int]  # [B + 1] offsets of each request's tokens in the batch
    seq_lens: list[int]  # [B] computed + new tokens
    # requests with a single causal new token are batched together
    decode_reqs: torch.Tensor  # [Bd] request indices
    decode_tokens: torch.Tensor  # [Bd] their token index in the batch
    decode_seq_lens: torch.Tensor  # [Bd]
    other_reqs: list[int]  # the rest (prefill chunks, trees), one attention call each
    custom_masks: Optional[dict[int, torch.Tensor]] = None  # req index -> [q, q] bool
    # a backend's per-step work shared by all layers (gather indices, masks), built by layer 0
    scratch: dict = field(default_factory=dict)


class AttentionBackend(abc.ABC):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D], kv_cache [2, num_blocks, block_size, KVH, D] -> [T, H, D].
        Writes k/v into the cache at meta.slot_mapping, then attends."""
        self.write_kv(k, v, kv_cache, meta)
        return self.attend(q, k, v, kv_cache, meta, scale)

    @abc.abstractmethod
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Stores the step's new k/v [T, KVH, D] at meta.slot_mapping."""

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of q over the cache, whose new k/v are already written -> [T, H, D]."""


_BACKENDS = {
    "torch": "paraserve.attention.torch_ref:TorchAttentionBackend",
    "cpu": "paraserve.attention.cpu_paged:CpuPagedAttentionBackend",
}


def get_backend(name: str = "torch") -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def default_backend_name(device: torch.device) -> str:
    """'cpu' (the compiled paged decode kernel) on a CPU where it builds, else 'torch'.
    Builds the kernel on first call when it is not in torch's extension cache yet."""
    if device.type == "cpu":
        from paraserve.ops.cpu import kernels
        if kernels() is not None:
            return "cpu"
    return "torch"
