"""Contract 2: batching, chunked prefill, prefix hits, preemption and recompute never change a
request's greedy output; contract 5: no block leaks."""
import random

import pytest

from paraserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(n=6, seed=0, shared_prefix=()):
    rng = random.Random(seed)
    return [list(shared_prefix) + [rng.randrange(3, 380) for _ in range(rng.randrange(5, 70))]
            for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _run(path, prompts, one_at_a_time=False, **engine_args):
    args = dict(dtype="float32", block_size=4, max_model_len=256)
    args.update(engine_args)
    llm = LLM(path, **args)
    if one_at_a_time:
        outs = [llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    llm.engine.scheduler.check_integrity()
    assert not llm.engine.scheduler.kv.req_blocks
    return [o.outputs[0].token_ids for o in outs], llm


def test_batched_equals_one_at_a_time(model_path):
    prompts = _prompts()
    alone, _ = _run(model_path, prompts, one_at_a_time=True, enable_prefix_caching=False)
    batched, llm = _run(model_path, prompts, enable_prefix_caching=False)
    assert batched == alone


def test_small_chunks_equal_whole_prefill(model_path):
    prompts = _prompts(seed=1)
    ref, _ = _run(model_path, prompts, one_at_a_time=True, enable_prefix_caching=False)
    chunked, _ = _run(model_path, prompts, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert chunked == ref


def test_prefix_cache_hits_do_not_change_output(model_path):
    prompts = _prompts(seed=2, shared_prefix=list(range(10, 50)))
    ref, _ = _run(model_path, prompts, one_at_a_time=True, enable_prefix_caching=False)
    cached, llm = _run(model_path, prompts, one_at_a_time=True, enable_prefix_caching=True)
    assert cached == ref
    kv = llm.engine.scheduler.kv
    assert kv.prefix_hits >= 5 * 40 - 5 * 4  # later prompts reuse the shared 40-token prefix


def test_preemption_and_recompute_do_not_change_output(model_path):
    prompts = _prompts(n=8, seed=3)
    ref, _ = _run(model_path, prompts, one_at_a_time=True, enable_prefix_caching=False)
    # 40 blocks x 4 tokens: far too few for 8 requests of up to ~95 tokens at once
    tight, llm = _run(model_path, prompts, num_gpu_blocks_override=40, enable_prefix_caching=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tight == ref


def test_abort_frees_blocks(model_path):
    llm = LLM(model_path, dtype="float32", block_size=4, max_model_len=256)
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": list(range(3, 40))}, SamplingParams(max_tokens=50))
    eng.add_request("b", {"prompt_token_ids": list(range(5, 30))}, SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.scheduler.kv.req_blocks
    eng.abort_request(["a"])
    while eng.has_unfinished_requests():
        eng.step()
    eng.scheduler.check_integrity()
    assert not eng.scheduler.kv.req_blocks
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.num_blocks


def test_n_parallel_samples_share_prompt_blocks(model_path):
    llm = LLM(model_path, dtype="float32", block_size=4, max_model_len=256)
    prompt = list(range(3, 43))  # 40 tokens = 10 full blocks
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # distinct samples
    kv = llm.engine.scheduler.kv
    assert kv.prefix_hits >= 2 * 36  # the two siblings reused the first child's prompt blocks
    llm.engine.scheduler.check_integrity()
