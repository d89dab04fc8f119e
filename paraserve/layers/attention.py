"""Attention over the paged KV cache: the model's view, the backend does the work."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from paraserve.attention.backend import AttentionBackend
from paraserve.attention.forward_context import get_attention_metadata
from paraserve.layers.ring_attention import decode_attention_cp, ring_attention
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
        cp = meta.scratch.get("cp")  # context parallel step (worker/cp_inputs.py), else None
        if cp is not None:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            return self._forward_cp(q, k, v, cp)
        if rotary is not None:
            if cpu.applies(q, self.kv_cache) and self.kv_cache.is_contiguous():
                cpu.kernels().rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, self.kv_cache,
                                             meta.slot_mapping)
                return self.backend.attend(q, k, v, self.kv_cache, meta, self.scale)
            q, k = rotary(positions, q, k)
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)

    def _forward_cp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp) -> torch.Tensor:
        """Context parallel: ring attention for prefill chunks split zigzag over the CP ranks,
        local attention + log-sum-exp merge for decodes and small chunks. This rank's cache holds
        the positions it owns only (worker/cp_inputs.py explains the layout)."""
        flat = self.kv_cache.view(2, -1, *self.kv_cache.shape[-2:])  # [2, slots, KVH, D]
        out = torch.empty_like(q)
        for part in cp.rings:
            end = part.start + part.positions.shape[0]
            kb, vb, kpos = k[part.start:end], v[part.start:end], part.positions
            if part.ctx_slots is not None:  # the cached context this rank holds rides along
                kb = torch.cat([kb, flat[0, part.ctx_slots]])
                vb = torch.cat([vb, flat[1, part.ctx_slots]])
                kpos = torch.cat([kpos, part.ctx_positions])

            def store(kb: torch.Tensor, vb: torch.Tensor, kpos: torch.Tensor, part=part) -> None:
                rel = kpos - part.first_new  # < 0: cached context or padding, already stored
                slots = part.slot_of[rel.clamp(0, part.slot_of.shape[0] - 1)]
                keep = (rel >= 0) & (slots >= 0)  # the new positions of this block this rank owns
                flat[0, slots[keep]] = kb[keep]
                flat[1, slots[keep]] = vb[keep]

            out[part.start:end] = ring_attention(
                q[part.start:end], kb, vb, part.positions, kpos, cp.group, self.scale, causal=True,
                local_size=cp.local_size, stats=cp.stats, on_block=store)
        if cp.rep_tokens is not None:
            flat[0, cp.write_slots] = k[cp.write_tokens]
            flat[1, cp.write_slots] = v[cp.write_tokens]
            out[cp.rep_tokens] = decode_attention_cp(
                q[cp.rep_tokens], flat[0, cp.key_slots], flat[1, cp.key_slots], cp.group, self.scale,
                cp.rep_mask)
        return out
