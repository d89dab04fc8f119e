"""The OpenAI-compatible server as users drive it: the official `openai` client and raw HTTP
against a real `paraserve serve` process."""
import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paraserve import LLM, SamplingParams

ARGS = ("--dtype", "float32", "--max-model-len", "256", "--block-size", "4", "--max-num-seqs", "64")


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def server(start_server, model_path):
    return start_server(model_path, *ARGS, "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model_path, dtype="float32", max_model_len=256, block_size=4)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("" if not s.labels.get("finished_reason") else f"[{s.labels['finished_reason']}]")
            if "le" in s.labels:
                key += f"{{le={s.labels['le']}}}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_models_and_health(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_greedy_equals_offline_api(client, offline):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(offline.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 20, n_prompt + 20)


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="tiny", prompt="def add(a, b):", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_completion_token_prompt_list_and_n(client, offline):
    ids = offline.tokenizer.encode("Paris is the capital")
    ids2 = offline.tokenizer.encode("Once upon a time")
    r = client.completions.create(model="tiny", prompt=[ids, ids2], max_tokens=5, n=2,
                                  temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 20


def test_completion_logprobs_and_echo(client):
    r = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=4, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4
    # keyed by text: byte-fragment tokens that all render as U+FFFD collapse into one key
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(lp.top_logprobs[i][tok] == lp.token_logprobs[i] for i, tok in enumerate(lp.tokens)
               if tok != "\ufffd")
    e = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=2, temperature=0, echo=True,
                                  logprobs=1, extra_body={"ignore_eos": True})
    assert e.choices[0].text.startswith("Once upon a")
    assert e.choices[0].logprobs.token_logprobs[0] is None  # the first prompt token has none


def test_stop_string(client, offline):
    full = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[5:8]
    assert stop.strip(), full
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=30,
                                              temperature=0, stop=[stop], stream=True,
                                              extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_chat_and_chat_stream(client, offline):
    msgs = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    ref = offline.chat(msgs, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert len(r.choices[0].logprobs.content) == 16
    assert all(len(c.top_logprobs) == 2 for c in r.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "hi", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


BAD = [
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "x " * 400, "max_tokens": 5}, 400, None),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": "hi", "n": "many"}, 400, "n"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": [10**9]}, 400, "prompt"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_completion_inputs(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    if param:
        assert err["param"] == param


@pytest.mark.parametrize("body", [{"messages": []}, {"messages": [{"role": "alien", "content": "x"}]},
                                  {"messages": "hello"}, {}])
def test_bad_chat_inputs(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and "error" in r.json()


def test_malformed_json_and_server_keeps_serving(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].text is not None


def test_tokenize_detokenize(server, offline):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == offline.tokenizer.encode("Hello world")
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert d["prompt"] == "Hello world"


def test_32_concurrent_streams_are_batched(server):
    before = metrics(server)

    async def one(i: int, http: httpx.AsyncClient) -> str:
        text = ""
        async with http.stream("POST", server.url + "/v1/completions", json={
                "prompt": f"Request number {i}", "max_tokens": 16, "temperature": 0, "stream": True,
                "ignore_eos": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_of_them():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(i, http) for i in range(32)))

    texts = asyncio.run(all_of_them())
    assert len(texts) == 32
    after = metrics(server)
    done = after["paraserve:request_success_total[length]"] - before.get("paraserve:request_success_total[length]", 0)
    assert done == 32
    steps = after["paraserve:step_running_requests_count"] - before["paraserve:step_running_requests_count"]
    running = after["paraserve:step_running_requests_sum"] - before["paraserve:step_running_requests_sum"]
    assert running / steps > 4  # many requests shared each step
    assert after["paraserve:generation_tokens_total"] - before["paraserve:generation_tokens_total"] == 32 * 16


def test_disconnect_mid_stream_frees_blocks(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "A long story", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        for i, line in enumerate(r.iter_lines()):
            if i > 4:
                break  # the client goes away mid-stream
    for _ in range(100):
        m = metrics(server)
        if m["paraserve:num_requests_running"] == 0 and m["paraserve:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.1)
    assert m["paraserve:num_requests_running"] == 0
    assert m["paraserve:kv_cache_usage_perc"] == 0
    assert m.get("paraserve:request_success_total[abort]", 0) >= 1


def test_api_key_required(start_server, model_path):
    s = start_server(model_path, *ARGS, "--api-key", "sekret")
    assert httpx.get(s.url + "/v1/models").status_code == 401
    body = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}).json()
    assert body["error"]["code"] == 401
    ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret").completions.create(
        model=s_model(s), prompt="hi", max_tokens=2)
    assert ok.choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    s.stop()


def s_model(s):
    return httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).json()["data"][0]["id"]


def test_queue_full_is_429_with_retry_after(start_server, model_path):
    s = start_server(model_path, *ARGS[:-2], "--max-num-seqs", "1", "--max-queue", "0")

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(s.url + "/v1/completions", json={
                "prompt": "hi", "max_tokens": 200, "ignore_eos": True}) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes  # one runs, the rest are turned away, nothing hangs
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"] == "1" and rejected.json()["error"]["code"] == 429
    assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    s.stop()


def test_sigterm_lets_running_request_finish(start_server, model_path):
    s = start_server(model_path, *ARGS)
    n_chunks, signalled, lines = 0, False, []
    with httpx.stream("POST", s.url + "/v1/completions", timeout=120, json={
            "prompt": "hi", "max_tokens": 150, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if n_chunks == 1 and not signalled:
                s.proc.send_signal(signal.SIGTERM)  # the request is mid-stream
                signalled = True
            if line:
                lines.append(line)
            if line.startswith("data: {"):
                n_chunks += 1
                last = json.loads(line[6:])
    assert signalled
    assert lines[-1] == "data: [DONE]"
    assert last["usage"]["completion_tokens"] == 150
    assert s.proc.wait(30) == 0
