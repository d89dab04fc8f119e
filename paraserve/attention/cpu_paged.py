"""The CPU backend: decodes attend straight from the paged cache through a compiled kernel.

The reference gathers each decode's K/V rows into a contiguous copy and then runs SDPA, reading
the cache twice; paraserve/ops/csrc/paged_attention.cpp walks the block tables once with an
online softmax. Prefill chunks and trees keep the reference's path. When the kernels cannot be
built, this backend behaves exactly like the reference.
"""
from __future__ import annotations

import torch

from paraserve.attention.backend import AttentionMetadata
from paraserve.attention.torch_ref import TorchAttentionBackend
from paraserve.ops import cpu


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], k/v_cache [num_blocks, block_size, KVH, D], block_tables [B, max_blocks] and
    seq_lens [B] int64 -> [B, H, D]. float32 or bfloat16; head_dim a multiple of the kernel's
    HEAD_DIM_MULTIPLE (its SIMD width: 16 under AVX-512, 8 under AVX, else 4). Raises if the kernel
    cannot be built."""
    kernel = cpu.kernels()
    if kernel is None:
        raise RuntimeError("the CPU kernels are not available on this machine")
    return kernel.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def _decode_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
        if not cpu.applies(q) or q.shape[-1] % cpu.kernels().HEAD_DIM_MULTIPLE:
            return super()._decode_attention(q, kv_cache, meta, scale)
        tables = meta.scratch.get("cpu_decode_tables")  # the same for every layer of the step
        if tables is None:
            tables = meta.scratch["cpu_decode_tables"] = meta.block_tables[meta.decode_reqs]  # [Bd, max_blocks]
        return cpu.kernels().paged_decode_attention(q, kv_cache[0], kv_cache[1], tables,
                                                    meta.decode_seq_lens, scale)  # [Bd, H, D]
