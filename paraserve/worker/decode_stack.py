"""Decode steps on CPU through one C++ call for the whole decoder (ops/csrc/decoder_stack.cpp).

A batch-1 decode step of SmolLM2 runs ~300 small kernels; the Python around them (module calls,
views, metadata look-ups) cost ~1.9 ms of a 15 ms token. The C++ stack runs the same kernels with
the same arguments layer after layer, so its hidden states are bit-identical to the module path:
it is to a CPU decode step what a CUDA graph is to a GPU one, and `--enforce-eager` turns it off
as it turns CUDA graphs off in vLLM.

It takes a step when every query is a decode token or a draft-tree node (prefill chunks keep the
module path, whose attention is SDPA) and every linear layer would run one of the stack's two
kernels: panel_linear for panel-packed weights (AMX tiles or AVX-512 BF16), the few-row kernel
otherwise (at most SMALL_M_MAX rows).
Models it does not know (MoE blocks, tensor or context parallel shards, other backends) always
take the module path.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from paraserve.attention.backend import AttentionMetadata
from paraserve.attention.cpu_paged import CpuPagedAttentionBackend, kernel_plan
from paraserve.distributed.parallel_state import get_cp_group, get_tp_group
from paraserve.layers.linear import LinearBase
from paraserve.models.llama import MLP, LlamaForCausalLM
from paraserve.ops import cpu

logger = logging.getLogger("paraserve")


class DecodeStack:
    def __init__(self, model: LlamaForCausalLM, stack, all_panels: bool) -> None:
        self.model = model
        self.stack = stack
        self.max_rows = None if all_panels else cpu.SMALL_M_MAX  # the few-row kernel's limit

    @classmethod
    def build(cls, model: torch.nn.Module) -> Optional["DecodeStack"]:
        """The stack over `model`'s weights and bound KV caches, or None where it does not apply."""
        reason = _unsupported(model)
        if reason is not None:
            logger.debug("decode steps run module by module: %s", reason)
            return None
        first = model.layers[0].self_attn
        stack = cpu.kernels().DecoderStack(first.num_heads, first.num_kv_heads, first.head_dim,
                                           model.norm.eps, first.attn.scale, first.rotary.cos,
                                           first.rotary.sin, model.norm.weight)
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            stack.add_layer(layer.input_layernorm.weight, _linear(a.qkv_proj), _linear(a.o_proj),
                            layer.post_attention_layernorm.weight, _linear(mlp.gate_up_proj),
                            _linear(mlp.down_proj), a.q_norm.weight if a.q_norm is not None else None,
                            a.k_norm.weight if a.k_norm is not None else None, a.attn.kv_cache)
        linears = [m for m in model.layers.modules() if isinstance(m, LinearBase)]
        return cls(model, stack, all(_panels(m) for m in linears))

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> Optional[torch.Tensor]:
        """Final hidden states [T, hidden] of a decode step, or None: the step is not one the stack
        runs (then the caller runs the model's modules)."""
        args = self._attention_args(meta, input_ids.shape[0])
        if args is None:
            return None
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        return self.stack.forward(x, meta.positions, meta.slot_mapping, *args)

    def _attention_args(self, meta: AttentionMetadata, num_tokens: int) -> Optional[tuple]:
        if self.max_rows is not None and num_tokens > self.max_rows:
            return None
        if meta.scratch.get("cp") is not None:
            return None
        if not meta.other_reqs:  # decodes only, in batch order
            return meta.block_tables[meta.decode_reqs], meta.decode_seq_lens
        masks = meta.custom_masks or {}
        if any(i not in masks for i in meta.other_reqs):  # a prefill chunk
            return None
        plan = meta.scratch.get("cpu_plan")
        if plan is None:
            plan = meta.scratch["cpu_plan"] = kernel_plan(meta)
        return plan.tables, plan.ctx_lens, plan.extra, plan.extra_lens


def _unsupported(model: torch.nn.Module) -> Optional[str]:
    if not isinstance(model, LlamaForCausalLM) or not len(model.layers):
        return f"{type(model).__name__} is not a Llama-family decoder"
    if get_tp_group().size > 1 or get_cp_group().size > 1:
        return "tensor or context parallel shards"
    if not all(type(layer.mlp) is MLP for layer in model.layers):
        return "MoE blocks"
    attn = model.layers[0].self_attn
    if not isinstance(attn.attn.backend, CpuPagedAttentionBackend) or cpu.kernels() is None:
        return "not the CPU paged attention backend"
    if attn.head_dim % cpu.kernels().HEAD_DIM_MULTIPLE:
        return f"head_dim {attn.head_dim} is not a multiple of {cpu.kernels().HEAD_DIM_MULTIPLE}"
    if model.norm.weight.dtype not in cpu.DTYPES or model.norm.weight.device.type != "cpu":
        return f"{model.norm.weight.dtype} weights"
    for layer in model.layers:
        cache = layer.self_attn.attn.kv_cache
        if cache is None or not cache.is_contiguous() or cache.dtype != model.norm.weight.dtype:
            return "the KV cache is not bound, contiguous and in the model's dtype"
    return None


def _panels(linear: LinearBase) -> bool:
    packed = getattr(linear, "packed", None)
    return packed is not None and packed.panels


def _linear(linear: LinearBase) -> tuple:
    """(weight, panel-packed weight or None, bias or None): what packed_linear would run."""
    return linear.weight, linear.packed.data if _panels(linear) else None, linear.bias
