"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3), written as single-device
code over parallel-aware layers. MoE models subclass it and swap the MLP block."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from paraserve.attention.backend import AttentionBackend
from paraserve.distributed.parallel_state import get_tp_group
from paraserve.layers.attention import Attention
from paraserve.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from paraserve.layers.layernorm import RMSNorm
from paraserve.layers.activation import silu_and_mul
from paraserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from paraserve.layers.rotary import RotaryEmbedding
from paraserve.layers.weight_utils import materialize


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class SelfAttention(nn.Module):
    def __init__(self, config, backend: AttentionBackend, rotary: RotaryEmbedding,
                 qk_norm: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        bias = getattr(config, "attention_bias", False) or config.model_type.startswith("qwen2")
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, hidden, False)
        self.rotary = rotary
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn(q, k, v, positions, self.rotary)  # [T, H, D]
        return self.o_proj(o.flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, backend: AttentionBackend, rotary: RotaryEmbedding,
                 mlp: nn.Module, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, backend, rotary, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    # checkpoint name fragment -> (our name fragment, shard id)
    stacked_params = [(".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"),
                      (".v_proj.", ".qkv_proj.", "v"), (".gate_proj.", ".gate_up_proj.", 0),
                      (".up_proj.", ".gate_up_proj.", 1)]

    def __init__(self, config, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, rotary, self.make_mlp(config, i), self.qk_norm)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.tp = get_tp_group()

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return MLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False))

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, vocab]

    # ---- weights -------------------------------------------------------------------------

    def map_weight_name(self, name: str) -> tuple[str, object]:
        """Checkpoint name -> (our parameter name, shard id for its weight_loader)."""
        for src, dst, shard in self.stacked_params:
            if src in name:
                return name.replace(src, dst), shard
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            ours, shard = self.map_weight_name(name.removeprefix("model."))
            if ours not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[ours]
            # loaders read only their shard (of a lazy safetensors slice too); copy_ casts the dtype
            if hasattr(param, "weight_loader"):
                param.weight_loader(param, tensor, shard)
            else:
                param.data.copy_(materialize(tensor))
            loaded.add(ours)
        missing = {n for n in params if n not in loaded}
        if self.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {sorted(missing)[:3]}")


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass  # attention biases follow from model_type


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
