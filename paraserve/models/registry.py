"""Architecture name -> model class, imported lazily."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": "llama:LlamaForCausalLM",
    "MistralForCausalLM": "llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "llama:Qwen3ForCausalLM",
    "MixtralForCausalLM": "moe_models:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "moe_models:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "moe_models:Qwen3MoeForCausalLM",
}


def get_model_class(config):
    for arch in getattr(config, "architectures", None) or []:
        if arch in _MODELS:
            module, cls = _MODELS[arch].split(":")
            return getattr(importlib.import_module(f"paraserve.models.{module}"), cls)
    raise ValueError(f"unsupported architecture {getattr(config, 'architectures', None)}; "
                     f"supported: {', '.join(sorted(_MODELS))}")


def check_parallel(config, layout, num_redundant_experts: int = 0) -> None:
    """Raise ConfigError (one line) when `config`'s model cannot be split as `layout`
    (a ParallelLayout) says; the driver calls it before it starts any worker."""
    from paraserve.config import ConfigError
    from paraserve.layers.eplb import ExpertPlacement
    from paraserve.layers.linear import split_heads

    split_heads(config.num_attention_heads, config.num_key_value_heads, layout.tp)
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    checks = [("intermediate_size", config.intermediate_size, layout.tp, "tensor")]
    if num_experts:
        expert_size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        checks.append(("expert intermediate size", expert_size, layout.etp, "expert tensor"))
        shared = getattr(config, "shared_expert_intermediate_size", None) or 0
        checks.append(("shared_expert_intermediate_size", shared, layout.tp, "tensor"))
    for name, value, parts, kind in checks:
        if value % parts:
            raise ConfigError(f"the model's {name} ({value}) is not divisible by the {kind} "
                              f"parallel size ({parts})")
    if num_experts:
        ExpertPlacement.build(num_experts, layout.ep, num_redundant_experts,
                              [1.0] * num_experts if num_redundant_experts else None)
