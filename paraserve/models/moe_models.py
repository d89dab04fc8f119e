"""MoE decoders: Mixtral (softmax top-2, renormalised) and Qwen2-MoE / Qwen3-MoE (top-k,
renormalised per config, shared expert with a sigmoid gate where the config has one)."""
from __future__ import annotations

import re

import torch
from torch import nn

from paraserve.layers.linear import ReplicatedLinear
from paraserve.layers.moe import FusedMoE
from paraserve.models.llama import MLP, LlamaForCausalLM

_EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    def __init__(self, config, num_experts: int, intermediate_size: int, renormalize: bool,
                 shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                intermediate_size, renormalize)
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
        return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size, True)

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
                              getattr(config, "shared_expert_intermediate_size", 0) or 0)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True
