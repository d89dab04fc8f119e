"""MoE decoders: Mixtral (softmax top-2, renormalised) and Qwen2-MoE / Qwen3-MoE (top-k,
renormalised per config, shared expert with a sigmoid gate where the config has one).

Expert parallelism needs nothing here but a placement per layer: `num_redundant_experts` extra
replicas of the hottest experts, chosen from `expert_load` (a load history, e.g. a previous
run's `expert_load()`); every EP rank must be given the same history.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from paraserve.attention.backend import AttentionBackend
from paraserve.distributed.parallel_state import get_ep_group
from paraserve.layers.eplb import ExpertPlacement
from paraserve.layers.linear import ReplicatedLinear
from paraserve.layers.moe import FusedMoE
from paraserve.models.llama import MLP, LlamaForCausalLM

_EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    def __init__(self, config, num_experts: int, intermediate_size: int, renormalize: bool,
                 shared_intermediate_size: int = 0,
                 placement: Optional[ExpertPlacement] = None) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)  # on every rank
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                intermediate_size, renormalize, placement)
        self.shared_expert = None
        if shared_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, shared_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class _MoeForCausalLM(LlamaForCausalLM):
    expert_names = {"w1": "w1", "w3": "w3", "w2": "w2"}  # checkpoint -> FusedMoE shard

    def __init__(self, config, backend: AttentionBackend, max_positions: int, *,
                 num_redundant_experts: int = 0,
                 expert_load: Optional[Mapping[int, Sequence[float]]] = None) -> None:
        # read by make_mlp, which LlamaForCausalLM.__init__ calls for each layer
        self.num_redundant_experts = num_redundant_experts
        self.expert_load_history = dict(expert_load or {})  # layer index -> per-expert load
        super().__init__(config, backend, max_positions)

    def placement(self, layer_idx: int, num_experts: int) -> ExpertPlacement:
        return ExpertPlacement.build(num_experts, get_ep_group().size, self.num_redundant_experts,
                                     self.expert_load_history.get(layer_idx))

    def moe_layers(self) -> dict[int, FusedMoE]:
        return {i: layer.mlp.experts for i, layer in enumerate(self.layers)
                if isinstance(layer.mlp, SparseMoeBlock)}

    def expert_load(self) -> dict[int, torch.Tensor]:
        """Layer index -> [E] assignments routed to each expert by this rank since the last
        reset_counters(): a load history for `expert_load=`."""
        return {i: moe.expert_counts.clone() for i, moe in self.moe_layers().items()}

    def reset_counters(self) -> None:
        for moe in self.moe_layers().values():
            moe.reset_counters()

    def map_weight_name(self, name: str) -> tuple[str, object]:
        m = _EXPERT.search(name)
        if m and m.group(2) in self.expert_names:
            which = self.expert_names[m.group(2)]
            param = "w2" if which == "w2" else "w13"
            return name[:m.start()] + f".experts.{param}", (int(m.group(1)), which)
        if name.endswith(".experts.gate_up_proj"):  # transformers 5 in-memory layout
            return name.replace("gate_up_proj", "w13"), None
        if name.endswith(".experts.down_proj"):
            return name.replace("down_proj", "w2"), None
        return super().map_weight_name(name)


class MixtralForCausalLM(_MoeForCausalLM):
    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size, True,
                              placement=self.placement(layer_idx, config.num_local_experts))

    def map_weight_name(self, name: str) -> tuple[str, object]:
        return super().map_weight_name(name.replace(".block_sparse_moe.", ".mlp."))


class Qwen2MoeForCausalLM(_MoeForCausalLM):
    expert_names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        sparse = (layer_idx not in getattr(config, "mlp_only_layers", []) and config.num_experts > 0
                  and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)
        if not sparse:
            return MLP(config.hidden_size, config.intermediate_size)
        return SparseMoeBlock(config, config.num_experts, config.moe_intermediate_size,
                              bool(getattr(config, "norm_topk_prob", False)),
                              getattr(config, "shared_expert_intermediate_size", 0) or 0,
                              self.placement(layer_idx, config.num_experts))


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True
