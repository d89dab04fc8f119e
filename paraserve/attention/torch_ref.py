"""The reference backend: plain torch SDPA over K/V gathered from the paged cache.

Gather indices and masks depend only on the step, not the layer: the first layer builds them
into meta.scratch and the others reuse them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from paraserve.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        kvh, d = kv_cache.shape[-2:]
        kv_cache[0].view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)  # [num_slots, KVH, D]
        kv_cache[1].view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not meta.other_reqs:  # all decodes, in batch order: no scatter into `out` needed
            return self._decode_attention(q, kv_cache, meta, scale)
        out = torch.empty_like(q)
        if meta.decode_reqs.numel():
            out[meta.decode_tokens] = self._decode_attention(q[meta.decode_tokens], kv_cache, meta, scale)
        self._attend_chunks(q, k, v, kv_cache, meta, scale, out)
        return out

    def _attend_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float, out: torch.Tensor,
                       skip: frozenset[int] = frozenset()) -> None:
        """Prefill chunks and trees (those not in `skip`), one SDPA each, written into `out`."""
        kvh, d = kv_cache.shape[-2:]
        k_flat = kv_cache[0].view(-1, kvh, d)  # [num_slots, KVH, D]
        v_flat = kv_cache[1].view(-1, kvh, d)
        for i, (s, e, slots, mask) in zip(meta.other_reqs, self._extend_plan(meta, kv_cache.shape[2])):
            if i in skip:
                continue
            qi = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if slots is None:  # a fresh prompt: its keys are exactly the new ones
                ki, vi = k[s:e], v[s:e]
            else:
                ki, vi = k_flat[slots], v_flat[slots]
            o = F.scaled_dot_product_attention(
                qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, is_causal=slots is None, scale=scale, enable_gqa=True)
            out[s:e] = o.squeeze(0).transpose(0, 1)

    def _decode_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
        """The single-token causal requests, batched: q [Bd, H, D] -> [Bd, H, D]."""
        kvh, d = kv_cache.shape[-2:]
        slots, valid = self._decode_plan(meta, kv_cache.shape[2])
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [Bd, H, 1, D]
            kv_cache[0].view(-1, kvh, d)[slots].transpose(1, 2),  # [Bd, KVH, L, D]
            kv_cache[1].view(-1, kvh, d)[slots].transpose(1, 2),
            attn_mask=valid, scale=scale, enable_gqa=True)
        return o.squeeze(2)

    def _decode_plan(self, meta: AttentionMetadata, block_size: int):
        plan = meta.scratch.get("decode")
        if plan is None:
            max_len = int(meta.decode_seq_lens.max())
            pos = torch.arange(max_len)
            tables = meta.block_tables[meta.decode_reqs]  # [Bd, max_blocks]
            slots = tables[:, pos // block_size] * block_size + pos % block_size  # [Bd, L]
            valid = (pos < meta.decode_seq_lens.unsqueeze(1))[:, None, None, :]  # [Bd, 1, 1, L]
            plan = meta.scratch["decode"] = (slots, valid)
        return plan

    def _extend_plan(self, meta: AttentionMetadata, block_size: int):
        """Per request: (token start, end, cache slots or None, mask or None)."""
        plan = meta.scratch.get("extend")
        if plan is None:
            plan = []
            for i in meta.other_reqs:
                s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
                n, seq_len = e - s, meta.seq_lens[i]
                tree: Optional[torch.Tensor] = None if meta.custom_masks is None else meta.custom_masks.get(i)
                if seq_len == n and tree is None:
                    plan.append((s, e, None, None))
                    continue
                pos = torch.arange(seq_len)
                slots = meta.block_tables[i, pos // block_size] * block_size + pos % block_size
                computed = seq_len - n
                mask = torch.ones(n, seq_len, dtype=torch.bool).tril(computed)  # causal over slots
                if tree is not None:
                    mask[:, computed:] = tree
                plan.append((s, e, slots, mask))
            meta.scratch["extend"] = plan
        return plan
