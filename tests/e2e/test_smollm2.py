"""The real embedded model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized) against transformers."""
import pytest
import torch

from paraserve import LLM, SamplingParams
from tiny_models import hf_greedy, hf_model_from_gguf

CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "Explain what a hash table is in two sentences.", "List three prime numbers."]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    return hf_model_from_gguf(smollm2_path)


def _chat_ids(llm, text):
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_greedy_matches_transformers_64_tokens(llm, hf_model):
    prompts = [_chat_ids(llm, c) for c in CHATS] + [llm.tokenizer.encode("def fibonacci(n):")]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 64)
    llm.engine.scheduler.check_integrity()


def test_prefill_logits_close_to_transformers(llm, hf_model):
    prompt = _chat_ids(llm, CHATS[2])
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    with torch.inference_mode():
        t = torch.tensor([prompt])
        ref = torch.log_softmax(hf_model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0], -1)
    diffs = [abs(out.prompt_logprobs[i][prompt[i]].logprob - ref[i - 1, prompt[i]].item())
             for i in range(1, len(prompt))]
    assert max(diffs) < 1e-3


def test_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == 2  # <|im_end|> ends it and is not in the text


def test_stop_string_is_cut_and_reported(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32, stop=["Paris"]), use_tqdm=False)[0]
    o = out.outputs[0]
    assert o.text == "The capital of France is "
    assert o.finish_reason == "stop" and o.stop_reason == "Paris"


def test_seeded_sampling_reproduces_regardless_of_batch(llm):
    prompt = {"prompt_token_ids": _chat_ids(llm, CHATS[1])}
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": _chat_ids(llm, c)} for c in CHATS]
    batch = llm.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=24)] * 2 + [params]
                         + [SamplingParams(temperature=1.0, max_tokens=24)] * 2, use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate(prompt, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_prompt_too_long_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="max-model-len"):
        llm.generate({"prompt_token_ids": [5] * 2000}, SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
