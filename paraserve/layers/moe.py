"""Mixture-of-experts block: a top-k router and stacked expert weights.

Tokens are grouped by expert (one sort), and each expert that received tokens runs one
batched SiLU-gated MLP over them: a loop over experts, never over tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from paraserve.distributed.parallel_state import get_ep_group


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool) -> None:
        super().__init__()
        self.ep = get_ep_group()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                requires_grad=False)  # gate rows then up rows
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size),
                               requires_grad=False)
        self.w13.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.intermediate_size = intermediate_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """shard_id = (expert, "w1" | "w3" | "w2") for one expert, or None for stacked weights."""
        if shard_id is None:
            param.data.copy_(loaded)
            return
        expert, which = shard_id  # type: ignore[misc]
        i = self.intermediate_size
        if which == "w1":
            param.data[expert, :i].copy_(loaded)
        elif which == "w3":
            param.data[expert, i:].copy_(loaded)
        else:
            param.data[expert].copy_(loaded)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(router_logits)
        weights = weights.to(x.dtype)
        flat_experts = experts.flatten()  # [T * k]
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k  # token index of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            tokens = token_of[start:start + n]
            h = F.linear(x[tokens], self.w13[e])  # [n, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])  # [n, H]
            out.index_add_(0, tokens, y * weights.flatten()[idx].unsqueeze(-1))
            start += n
        return out
