"""The C++ decoder stack (worker/decode_stack.py) against the module path it replaces on decode
steps: the same tokens and bit-identical logprobs, with prefill chunks, plain decodes and draft
trees in one batch, for every dense architecture; models it does not run keep the module path."""
import random

import pytest

from paraserve import LLM, SamplingParams
from paraserve.ops import cpu
from paraserve.worker.decode_stack import DecodeStack

pytestmark = pytest.mark.skipif(cpu.kernels() is None, reason="the CPU kernels cannot be compiled here")

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)


def _prompts(seed=0):
    """Repetitive prompts (n-gram drafts find matches) beside a long one that prefills in chunks."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randrange(4, 10))] * 3 for _ in range(3)] + \
           [[rng.randrange(3, 380) for _ in range(70)]]


def _runner(llm):
    return llm.engine.executor.worker.runner


def _generate(path, dtype, eager, spec=None):
    llm = LLM(str(path), dtype=dtype, block_size=4, max_model_len=256, max_num_batched_tokens=32,
              enforce_eager=eager, speculative_config=spec)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], llm


@pytest.fixture
def stack_steps(monkeypatch):
    """Counts the steps the stack ran: [plain decode steps, steps verifying draft trees]."""
    counts = [0, 0]
    forward = DecodeStack.forward

    def spy(self, input_ids, meta):
        hidden = forward(self, input_ids, meta)
        if hidden is not None:
            counts[bool(meta.custom_masks)] += 1
        return hidden

    monkeypatch.setattr(DecodeStack, "forward", spy)
    return counts


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stack_is_bit_identical_to_the_modules(tiny_model_dir, arch, dtype, stack_steps):
    path = tiny_model_dir(arch)
    eager, llm = _generate(path, dtype, eager=True)
    assert _runner(llm).stack is None and stack_steps == [0, 0]
    fused, llm = _generate(path, dtype, eager=False)
    assert _runner(llm).stack is not None and stack_steps[0] > 10
    assert fused == eager  # tokens and every logprob, exactly


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stack_verifies_draft_trees_as_the_modules_do(tiny_model_dir, dtype, stack_steps):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 64}
    path = tiny_model_dir("llama")
    eager, _ = _generate(path, dtype, eager=True, spec=spec)
    fused, llm = _generate(path, dtype, eager=False, spec=spec)
    assert stack_steps[1] > 0  # trees went through the stack
    assert fused == eager
    plain, _ = _generate(path, dtype, eager=False)
    assert [tokens for tokens, _ in fused] == [tokens for tokens, _ in plain]  # still lossless
    llm.engine.scheduler.check_integrity()


def test_models_the_stack_does_not_know_keep_the_modules(tiny_model_dir, stack_steps):
    llm = LLM(str(tiny_model_dir("mixtral")), dtype="float32", block_size=4, max_model_len=256)
    assert _runner(llm).stack is None
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and stack_steps == [0, 0]


def test_smollm2_bf16_decode_matches_the_modules(smollm2_path, stack_steps):
    """The real model in bf16, where every linear takes the AMX tiles if this CPU has them."""
    prompts = [[1, 9690, 198, 2683, 314, 253, 5356, 9651, 30], list(range(1000, 1060))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    results = []
    for eager in (True, False):
        llm = LLM(dtype="bfloat16", max_model_len=512, kv_cache_memory="64MiB", enforce_eager=eager)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs])
    assert stack_steps[0] >= 15
    assert results[0] == results[1]
