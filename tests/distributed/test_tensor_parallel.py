"""Tensor parallelism across gloo processes against one process: each rank loads only its shard
through the normal loader, runs prefill + greedy decode over its head-sharded paged KV cache,
and must produce the single-process logits (float32, tight tolerance) and greedy tokens."""
from __future__ import annotations

import pytest
import torch
from gloo_spawn import run_gloo
from model_harness import greedy, load_model, one_thread

from paraserve.config import ConfigError
from paraserve.distributed import parallel_state
from paraserve.layers.linear import split_heads
from paraserve.models.loader import iter_weights, resolve_model
from paraserve.models.registry import check_parallel

PROMPTS = [[1, 5, 9, 20, 33, 7, 100, 3, 55], [1, 200, 201, 17], list(range(3, 40)), [1, 300, 4, 77, 12]]
STEPS = 4
TOL = dict(atol=5e-5, rtol=5e-5)
DEEP_TOL = dict(atol=3e-4, rtol=1e-4)  # 30 layers of reassociated float32 sums (SmolLM2)


def single_process(path, prompts, weights=None):
    parallel_state.destroy_parallel_state()
    parallel_state.init_single_process()
    with one_thread():
        return greedy(load_model(path, weights=weights), prompts, STEPS)


def _tp_rank(rank: int, world: int, path, prompts, ref, kv_heads: int, bad_path, tol,
             weights=None) -> None:
    parallel_state.destroy_parallel_state()  # the forked parent's single-process groups
    parallel_state.init_distributed(tp_size=world)
    reads: list = []
    model = load_model(path, counter=reads, weights=weights)
    attn = model.attention_layers()[0]
    assert attn.num_kv_heads == kv_heads  # the cache holds this rank's KV heads only
    if reads[0].elements:  # safetensors: every rank read exactly the shard it keeps
        assert reads[0].elements == sum(p.numel() for p in model.parameters())
    logits, tokens = greedy(model, prompts, STEPS)
    for got, want in zip(logits, ref[0]):
        torch.testing.assert_close(got, want, **tol)
    assert tokens == ref[1]
    if bad_path is not None:  # a model whose heads this tp cannot split fails in one clear line
        with pytest.raises(ConfigError, match="tensor parallel size"):
            load_model(bad_path)
    parallel_state.destroy_parallel_state()


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama", 4), ("qwen3", 2), ("qwen3", 4),
                                     ("qwen2", 2)])
def test_tiny_models(arch, tp, tiny_model_dir):
    path = tiny_model_dir(arch)
    ref = single_process(path, PROMPTS)
    # 2 KV heads: split at tp 2, replicated (one per rank) at tp 4
    run_gloo(_tp_rank, tp, path, PROMPTS, ref, 1, None, TOL)


# ChatML prompts "What is the capital of France?" and "Name a color." with SmolLM2's default
# system prompt (the tokenizer takes seconds to build from the GGUF metadata)
_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
           407, 19712, 8182, 2, 198, 1, 4093, 198]
SMOL_PROMPTS = [_SYSTEM + [1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
                _SYSTEM + [5820, 253, 2380, 30, 2, 198, 1, 520, 9531, 198]]


def test_smollm2_tp3(smollm2_path, tiny_model_dir):
    """9 heads and 3 KV heads over 3 ranks; GGUF tensors are dequantized, then sliced."""
    weights = list(iter_weights(resolve_model(smollm2_path)))  # dequantized once, shared by fork
    ref = single_process(smollm2_path, SMOL_PROMPTS, weights)
    assert ref[1][0] == [504, 3575, 282, 4649, 314]  # "The capital of France is"
    run_gloo(_tp_rank, 3, smollm2_path, SMOL_PROMPTS, ref, 1, tiny_model_dir("llama"), DEEP_TOL,
             weights)


def test_head_counts_that_do_not_divide_are_a_config_error():
    assert split_heads(9, 3, 3) == (3, 1, 1)
    assert split_heads(4, 2, 4) == (1, 1, 2)
    with pytest.raises(ConfigError,
                       match=r"tensor parallel size 2 .* 9 attention heads .* use one of \[1, 3, 9\]"):
        split_heads(9, 3, 2)
    with pytest.raises(ConfigError, match="use one of"):
        split_heads(12, 8, 3)  # q heads split, KV heads neither split nor replicate


def test_check_parallel_before_starting_workers():
    from transformers import LlamaConfig, Qwen2MoeConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3)
    check_parallel(smol, parallel_state.ParallelLayout(3, tp=3))
    with pytest.raises(ConfigError, match="tensor parallel size 4"):
        check_parallel(smol, parallel_state.ParallelLayout(4, tp=4))
    moe = Qwen2MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         moe_intermediate_size=64, shared_expert_intermediate_size=96)
    check_parallel(moe, parallel_state.ParallelLayout(4, tp=2, ep=2), num_redundant_experts=2)
    with pytest.raises(ConfigError, match="divisible by the expert parallel size 4"):
        check_parallel(moe, parallel_state.ParallelLayout(4, tp=1, ep=4), num_redundant_experts=2)
