"""Tiny random models of every supported architecture, built with transformers itself, and the
Hugging Face greedy reference that paraserve is checked against."""
from __future__ import annotations

import os
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Once upon a time there was a small model that generated tokens very quickly.",
    "café naïve résumé 東京 😀 ünïcödé",
]

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    from transformers import (LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    moe = dict(num_experts_per_tok=2)
    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
        "llama3-rope": LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": Qwen2Config(**COMMON),
        "qwen3": Qwen3Config(**COMMON, head_dim=32),
        "mixtral": MixtralConfig(**COMMON, num_local_experts=4, **moe),
        "qwen2-moe": Qwen2MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=96, **moe),
        "qwen3-moe": Qwen3MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=64,
                                    norm_topk_prob=True, **moe),
    }


ARCHS = list(_configs().keys()) if os.environ.get("PARASERVE_NO_TINY") is None else []


def build_tokenizer(path: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 8, vocab_size=COMMON["vocab_size"], special_tokens=specials,
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


def build_model(arch: str, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    config = _configs()[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def load_hf(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with an explicit all-ones attention mask, EOS not special."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
        out = model(input_ids=torch.tensor([[tok]]), attention_mask=torch.ones_like(ids),
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


@torch.inference_mode()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position: [len(ids), vocab]."""
    t = torch.tensor([ids])
    return torch.log_softmax(model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0].float(), -1)


def hf_model_from_gguf(path: str) -> torch.nn.Module:
    """transformers' own GGUF loading (dequantize, rename, Q/K un-permute), without `accelerate`:
    from_pretrained(gguf_file=...) delegates to load_gguf_checkpoint, so call it directly."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval()
