"""Attention over the paged KV cache: the model's view, the backend does the work."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from paraserve.attention.backend import AttentionBackend
from paraserve.attention.forward_context import get_attention_metadata
from paraserve.layers.rotary import RotaryEmbedding
from paraserve.ops import cpu


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        # bound by the model runner once the cache is allocated
        self.kv_cache: Optional[torch.Tensor] = None  # [2, num_blocks, block_size, KVH, D]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: Optional[torch.Tensor] = None, rotary: Optional[RotaryEmbedding] = None
                ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> [T, H, D]. With `rotary`, q and k are first rotated at
        `positions`; on CPU one kernel does that in place and writes k/v into the cache."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound to the attention layer")
        meta = get_attention_metadata()
        if rotary is not None:
            if cpu.applies(q, self.kv_cache) and self.kv_cache.is_contiguous():
                cpu.kernels().rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, self.kv_cache,
                                             meta.slot_mapping)
                return self.backend.attend(q, k, v, self.kv_cache, meta, self.scale)
            q, k = rotary(positions, q, k)
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
