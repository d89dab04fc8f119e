"""The reference backend: plain torch SDPA over K/V gathered from the paged cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from paraserve.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, KVH, D]
        kvh, d = k_cache.shape[-2:]
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if meta.decode_reqs.numel():
            out[meta.decode_tokens] = self._decode(q[meta.decode_tokens], k_cache, v_cache, meta, scale)
        for i in meta.other_reqs:
            s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            mask = None if meta.custom_masks is None else meta.custom_masks.get(i)
            out[s:e] = self._extend(q[s:e], k_cache, v_cache, meta.block_tables[i],
                                    meta.seq_lens[i], mask, scale)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        bs = k_cache.shape[1]
        max_len = int(meta.decode_seq_lens.max())
        tables = meta.block_tables[meta.decode_reqs, : -(-max_len // bs)]  # [Bd, nb]
        keys = k_cache[tables].flatten(1, 2)[:, :max_len]  # [Bd, L, KVH, D]
        values = v_cache[tables].flatten(1, 2)[:, :max_len]
        valid = torch.arange(max_len) < meta.decode_seq_lens.unsqueeze(1)  # [Bd, L]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)  # [Bd, H, 1, D]
        return o.squeeze(2)

    def _extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                table: torch.Tensor, seq_len: int, tree_mask, scale: float) -> torch.Tensor:
        n = q.shape[0]
        bs = k_cache.shape[1]
        blocks = table[: -(-seq_len // bs)]
        keys = k_cache[blocks].flatten(0, 1)[:seq_len]  # [L, KVH, D]
        values = v_cache[blocks].flatten(0, 1)[:seq_len]
        computed = seq_len - n
        mask = torch.ones(n, seq_len, dtype=torch.bool).tril(computed)  # causal over slots
        if tree_mask is not None:
            mask[:, computed:] = tree_mask
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)  # [n, H, D]
