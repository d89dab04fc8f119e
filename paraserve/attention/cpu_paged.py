"""The CPU backend: decodes and draft trees attend straight from the paged cache through a
compiled kernel.

The reference gathers each request's K/V rows into a contiguous copy and then runs SDPA, reading
the cache twice; paraserve/ops/csrc/paged_attention.cpp walks the block tables once with an
online softmax. A draft-tree node is one more query of that kernel: its request's context, then
its ancestors' slots in depth order, so an accepted node's attention is computed exactly as plain
decoding computes it at that position (outputs do not depend on whether speculation ran). Prefill
chunks keep the reference's path. When the kernels cannot be built, this backend behaves exactly
like the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from paraserve.attention.backend import AttentionMetadata
from paraserve.attention.torch_ref import TorchAttentionBackend
from paraserve.ops import cpu


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           extra_slots: Optional[torch.Tensor] = None,
                           extra_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, H, D], k/v_cache [num_blocks, block_size, KVH, D], block_tables [B, max_blocks] and
    seq_lens [B] int64 -> [B, H, D]; query b reads seq_lens[b] tokens through its table, then
    extra_slots[b, :extra_lens[b]] (flat slots). float32 or bfloat16; head_dim a multiple of the
    kernel's HEAD_DIM_MULTIPLE (its SIMD width). Raises if the kernel cannot be built."""
    kernel = cpu.kernels()
    if kernel is None:
        raise RuntimeError("the CPU kernels are not available on this machine")
    return kernel.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                         extra_slots, extra_lens)


@dataclass
class _KernelPlan:
    """The step's queries for the kernel: every decode token and every tree node."""
    rows: torch.Tensor  # [Q] token index in the batch
    tables: torch.Tensor  # [Q, max_blocks]
    ctx_lens: torch.Tensor  # [Q] tokens read through the table
    extra: Optional[torch.Tensor]  # [Q, E] ancestor slots in depth order (self last)
    extra_lens: Optional[torch.Tensor]  # [Q]
    tree_reqs: frozenset[int]


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def _kernel_applies(self, q: torch.Tensor) -> bool:
        return cpu.applies(q) and q.shape[-1] % cpu.kernels().HEAD_DIM_MULTIPLE == 0

    def _decode_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
        if not self._kernel_applies(q):
            return super()._decode_attention(q, kv_cache, meta, scale)
        tables = meta.scratch.get("cpu_decode_tables")  # the same for every layer of the step
        if tables is None:
            tables = meta.scratch["cpu_decode_tables"] = meta.block_tables[meta.decode_reqs]  # [Bd, max_blocks]
        return cpu.kernels().paged_decode_attention(q, kv_cache[0], kv_cache[1], tables,
                                                    meta.decode_seq_lens, scale)  # [Bd, H, D]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not meta.custom_masks or not self._kernel_applies(q):
            return super().attend(q, k, v, kv_cache, meta, scale)
        plan = meta.scratch.get("cpu_plan")
        if plan is None:
            plan = meta.scratch["cpu_plan"] = kernel_plan(meta)
        out = torch.empty_like(q)
        out[plan.rows] = cpu.kernels().paged_decode_attention(
            q[plan.rows], kv_cache[0], kv_cache[1], plan.tables, plan.ctx_lens, scale, plan.extra, plan.extra_lens)
        self._attend_chunks(q, k, v, kv_cache, meta, scale, out, skip=plan.tree_reqs)
        return out


def kernel_plan(meta: AttentionMetadata) -> _KernelPlan:
    """Decode tokens read their whole sequence through the table; node j of a tree of n nodes
    reads the context before the tree, then the slots of the nodes its mask row selects (its
    ancestors and itself; nodes are in topological order, so index order is depth order)."""
    rows, reqs, ctx, extra = [], [], [], []
    starts = meta.query_start_loc
    for i, (start, end) in enumerate(zip(starts, starts[1:])):
        n, mask = end - start, meta.custom_masks.get(i)
        if n == 1 and mask is None:
            rows.append(start), reqs.append(i), ctx.append(meta.seq_lens[i]), extra.append([])
        elif mask is not None:
            slots = meta.slot_mapping[start:end].tolist()
            for j, row in enumerate(mask.tolist()):
                rows.append(start + j), reqs.append(i), ctx.append(meta.seq_lens[i] - n)
                extra.append([slots[a] for a in range(n) if row[a]])
    width = max(len(e) for e in extra)
    extra_t = torch.tensor([e + [0] * (width - len(e)) for e in extra], dtype=torch.long).view(len(extra), width)
    ints = torch.tensor([rows, reqs, ctx, [len(e) for e in extra]], dtype=torch.long)  # rows: contiguous views
    return _KernelPlan(ints[0], meta.block_tables[ints[1]], ints[2], extra_t, ints[3], frozenset(meta.custom_masks))
