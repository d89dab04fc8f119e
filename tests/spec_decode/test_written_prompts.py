"""train-drafter --generated-prompts: the base model writes more training prompts itself (user
requests sampled from its chat template's open user turn), and each gets its greedy answer."""
import pytest

from paraserve.config import ConfigError
from paraserve.spec_decode.train_drafter import (TrainDrafterConfig, generate, open_user_turn,
                                                 sample_prompts)


@pytest.fixture(scope="module")
def smol_llm(smollm2_path):
    from paraserve import LLM

    return LLM(model=smollm2_path, kv_cache_memory="512MiB", max_num_seqs=64)


def test_the_base_model_writes_distinct_seeded_user_requests(smol_llm):
    tok = smol_llm.get_tokenizer()
    prefix, stop = open_user_turn(tok)
    # the template up to the user's text: default system prompt, then the user header
    assert smol_llm.apply_chat_template([{"role": "user", "content": "Hi there"}])[:len(prefix)] == prefix
    assert tok.decode(prefix).endswith("<|im_start|>user\n") and stop == ["<|im_end|>"]

    written = sample_prompts(smol_llm, 12, seed=0)
    assert len(written) == 12
    assert len({p.lower() for p in written}) == 12  # no repeats
    assert all(len(p.split()) >= 3 and p == p.strip() and "<|im_" not in p for p in written)
    assert sample_prompts(smol_llm, 12, seed=0) == written  # seeded: reproducible
    assert sample_prompts(smol_llm, 12, seed=1) != written
    # an excluded request (the held-out ones) is skipped; the next one takes its place
    again = sample_prompts(smol_llm, 12, seed=0, exclude={written[0].upper()})
    assert again[:11] == written[1:] and written[0] not in again
    assert sample_prompts(smol_llm, 0, seed=0) == []


def test_written_prompts_get_one_greedy_answer_each(tiny_model_dir):
    from paraserve import LLM

    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory="64MiB")
    cfg = TrainDrafterConfig(out="unused", max_tokens=4, num_samples=2, temperature=0.8)
    shipped, heldout, written = ["a b c", "d e f"], ["g h i"], ["written one", "written two", "three"]
    train, held = generate(llm, shipped, heldout, cfg, written)
    # greedy per shipped and written prompt, then num_samples sampled answers per shipped one
    assert len(train) == 2 + 3 + 2 * 2 and len(held) == 1
    template = lambda p: llm.apply_chat_template([{"role": "user", "content": p}])
    expected = shipped + written + shipped * 2
    assert [s.token_ids[:s.prompt_len] for s in train] == [template(p) for p in expected]
    assert held[0].token_ids[:held[0].prompt_len] == template("g h i")
    # greedy answers of the written prompts are what plain greedy generation gives
    from paraserve import SamplingParams

    ref = llm.generate([{"prompt_token_ids": template(p)} for p in written],
                       SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [s.token_ids[s.prompt_len:] for s in train[2:5]] == [list(o.outputs[0].token_ids) for o in ref]


def test_generated_prompts_flag_checks():
    with pytest.raises(ConfigError, match="generated-prompts"):
        TrainDrafterConfig(out="x", generated_prompts=-1)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="chat template"):
        open_user_turn(NoTemplate())
