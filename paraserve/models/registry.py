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
