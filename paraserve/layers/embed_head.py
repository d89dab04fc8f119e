"""Vocab-parallel embedding and LM head: each TP rank holds a slice of the vocabulary
(ceil(vocab / tp) rows, zero-padded on the last rank)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from paraserve.distributed import comm
from paraserve.distributed.parallel_state import get_tp_group
from paraserve.layers.linear import pack_weight, packed_linear
from paraserve.layers.weight_utils import Loaded, narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        # the last rank's slice may be short (or empty); its padding rows stay zero
        rows = max(0, min(self.shard, self.vocab_size - self.start))
        if rows:
            param.data[:rows].copy_(narrow(loaded, 0, self.start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        inside = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * inside.unsqueeze(-1)
        return comm.all_reduce(out, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for a vocabulary slice per rank, gathered to the full vocabulary."""

    def process_weights_after_loading(self) -> None:
        self.packed = pack_weight(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, vocab]
        logits = packed_linear(hidden, self.weight, getattr(self, "packed", None), None)
        logits = comm.all_gather_last_dim(logits, self.tp)
        return logits[..., :self.vocab_size]
