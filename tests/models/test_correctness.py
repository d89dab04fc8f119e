"""Contract 1: float32 greedy decoding equals transformers token for token; prefill logits match."""
import pytest
import torch

from paraserve import LLM, SamplingParams
from tiny_models import ARCHS, hf_greedy, hf_logprobs, load_hf

PROMPTS = [[1, 5, 9, 20, 33, 7, 100, 3, 55], [1, 200, 201, 17], list(range(3, 60))]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    hf = load_hf(path)
    llm = LLM(str(path), dtype="float32", block_size=4, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
        assert out.outputs[0].finish_reason == "length"
    llm.engine.scheduler.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2-moe"])
def test_prefill_logprobs_match_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    hf = load_hf(path)
    llm = LLM(str(path), dtype="float32", block_size=4, max_model_len=256)
    prompt = PROMPTS[2]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5, logprobs=5), use_tqdm=False)[0]
    ref = hf_logprobs(hf, prompt)  # [P, V]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        tok = prompt[pos]
        assert entry[tok].logprob == pytest.approx(ref[pos - 1, tok].item(), abs=1e-4)
        top = torch.topk(ref[pos - 1], 5)
        for tid, val in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(val, abs=1e-4)
    sample_lp = out.outputs[0].logprobs[0]
    tok = out.outputs[0].token_ids[0]
    full = hf_logprobs(hf, prompt + [tok])
    assert sample_lp[tok].logprob == pytest.approx(full[-2, tok].item(), abs=1e-4)
    assert sample_lp[tok].rank == 1  # greedy picks the top token


def test_bfloat16_engine_tracks_transformers_bfloat16(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    llm = LLM(str(path), dtype="bfloat16", block_size=4, max_model_len=256)
    assert llm.engine.worker.dtype == torch.bfloat16
    prompt = PROMPTS[2]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    with torch.inference_mode():
        t = torch.tensor([prompt])
        ref = torch.log_softmax(hf(input_ids=t, attention_mask=torch.ones_like(t)).logits[0].float(), -1)
    diffs = [abs(out.prompt_logprobs[i][prompt[i]].logprob - ref[i - 1, prompt[i]].item()) for i in range(1, len(prompt))]
    assert max(diffs) < 0.15  # bf16 rounding differs in places, not in substance
    assert sum(diffs) / len(diffs) < 0.03
