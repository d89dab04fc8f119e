"""Tensor and expert parallelism through the engine: LLM(..., tensor_parallel_size=N) runs one
worker process per rank (gloo, one thread each) and must produce exactly the tokens of the
one-process engine, with continuous batching, chunked prefill and prefix caching on. A worker
that dies fails its requests with a clear error and takes no process with it into orphanhood.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from paraserve import LLM, SamplingParams
from paraserve.config import ConfigError
from paraserve.engine.executor import WorkerDiedError

SHARED = list(range(40, 64))  # 6 full blocks of 4: later prompts hit the prefix cache
PROMPTS = [SHARED + [5, 9, 20, 33, 7], SHARED + [200, 201, 17], [1, 300, 4, 77, 12, 90, 91, 92],
           SHARED + list(range(100, 131)), [7, 8, 9]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# small batches and token budgets: requests join and leave mid-run, long prompts are chunked
ENGINE = dict(dtype="float32", block_size=4, max_model_len=160, threads=1, max_num_seqs=3,
              max_num_batched_tokens=24, enable_prefix_caching=True)

_REFS: dict[tuple, list[list[int]]] = {}


def run(path, prompts=PROMPTS, params=GREEDY, **kw) -> tuple[list[list[int]], dict]:
    """Generate with the engine; tokens per prompt and what the run showed."""
    with LLM(str(path), **{**ENGINE, **kw}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        sched = llm.engine.scheduler
        sched.check_integrity()
        assert not sched.kv.req_blocks  # every block freed or held by the prefix cache only
        seen = {"prefix_hits": sched.kv.prefix_hits, "expert_load": llm.engine.expert_load(),
                "logprobs": [_logprobs(o) for o in outs],
                "drafts": llm.engine.spec_decoding_stats().num_drafts,
                "pids": [i["pid"] for i in llm.engine.executor.worker_info]}
    return [o.outputs[0].token_ids for o in outs], seen


def _logprobs(out) -> list[dict[int, float]]:
    """{token: logprob} per generated position (the chosen token and the top-N)."""
    return [{t: lp.logprob for t, lp in pos.items()} for pos in out.outputs[0].logprobs or []]


def assert_logprobs_close(got: list[list[dict]], want: list[list[dict]], atol: float = 1e-4) -> None:
    """Same top-N tokens at every position, log-probabilities within float32 reassociation."""
    assert want and all(len(r) > 0 and all(len(p) >= 3 for p in r) for r in want)  # there is something to compare
    assert [[sorted(p) for p in r] for r in got] == [[sorted(p) for p in r] for r in want]
    for g_req, w_req in zip(got, want):
        for g, w in zip(g_req, w_req):
            assert max(abs(g[t] - w[t]) for t in w) < atol, (g, w)


def reference(path, params=GREEDY, prompts=PROMPTS, **kw) -> list[list[int]]:
    key = (str(path), repr(params), repr(prompts), repr(kw))
    if key not in _REFS:
        _REFS[key] = run(path, prompts, params, **kw)[0]
    return _REFS[key]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def assert_gone(pids: list[int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "worker processes left behind"


# ---- same tokens as one process -------------------------------------------------------------

def test_tp2_tiny_llama_greedy_and_sampling(tiny_model_dir):
    path = tiny_model_dir("llama")
    tokens, seen = run(path, tensor_parallel_size=2)
    assert tokens == reference(path)
    assert seen["prefix_hits"] > 0
    assert_gone(seen["pids"])
    # random sampling: only rank 0 draws (per-request seeds and the engine seed alike) and the
    # other rank takes its tokens, so the draws are the one-process engine's
    sampled = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, ignore_eos=True, seed=s)
               for s in (None, 7, None, 11, 3)]
    assert run(path, params=sampled, tensor_parallel_size=2)[0] == reference(path, sampled)


def _random_drafter(path, base_model: str, vocab: int = 384, hidden: int = 64) -> str:
    """An untrained ReDrafter (random weights): it drafts poorly, enough for losslessness."""
    import torch

    from paraserve.spec_decode.redrafter import ReDrafter, ReDrafterConfig, save_drafter

    torch.manual_seed(0)
    drafter = ReDrafter(ReDrafterConfig(base_model, vocab, hidden, num_blocks=1), None)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.3)
    save_drafter(drafter, str(path), dtype=torch.float32)
    return str(path)


@pytest.mark.parametrize("method", ["ngram", "redrafter"])
def test_tp2_speculative_decoding(method, tiny_model_dir, tmp_path):
    """Draft trees are proposed on every rank (ReDrafter's beam search runs the vocab-parallel
    embedding, a collective) and verified on rank 0; its accepted paths and trees are broadcast,
    so every rank's KV cache and token state stay equal: greedy output is the plain one, and
    seeded sampling draws what the one-process speculative engine draws."""
    path = tiny_model_dir("llama")
    repeat = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5, 6, 3, 4], SHARED + SHARED[:10]]
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "redrafter":
        spec.update(beam_width=3, drafter_path=_random_drafter(tmp_path, path.name))
    tokens, seen = run(path, repeat, tensor_parallel_size=2, speculative_config=spec)
    assert tokens == reference(path, prompts=repeat) and seen["drafts"] > 0
    sampled = [SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=s) for s in (1, 2)]
    assert (run(path, repeat, sampled, tensor_parallel_size=2, speculative_config=spec)[0]
            == run(path, repeat, sampled, speculative_config=spec)[0])


def test_tp3_smollm2(smollm2_path):
    """The real model: 9 heads and 3 KV heads over 3 ranks, GGUF dequantized then sliced."""
    prompts = [[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
               [1, 4093, 198, 5820, 253, 2380, 30, 2, 198, 1, 520, 9531, 198]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(max_model_len=64, max_num_batched_tokens=64)
    tokens, _ = run(smollm2_path, prompts, params, tensor_parallel_size=3, **kw)
    assert tokens == reference(smollm2_path, params, prompts, **kw)


@pytest.mark.parametrize("arch,kw", [
    ("mixtral", dict(tensor_parallel_size=2, enable_expert_parallel=True)),  # EP 2 (= tp 2)
    ("qwen2-moe", dict(tensor_parallel_size=2, expert_parallel_size=2, num_redundant_experts=2)),
    ("qwen3-moe", dict(tensor_parallel_size=4, expert_parallel_size=2)),  # TP 4 x EP 2 (etp 2)
])
def test_expert_parallel(arch, kw, tiny_model_dir):
    path = tiny_model_dir(arch)
    ref_tokens, ref_seen = run(path)
    tokens, seen = run(path, **kw)
    assert tokens == ref_tokens
    assert seen["expert_load"] == ref_seen["expert_load"]  # every routed token counted once


LOGPROBS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(tensor_parallel_size=4)),  # 2 KV heads replicated over 4 ranks
    ("qwen3", dict(tensor_parallel_size=2)),
    ("qwen3", dict(tensor_parallel_size=4)),
    ("mixtral", dict(tensor_parallel_size=4, enable_expert_parallel=True)),  # EP 4
    ("qwen2-moe", dict(tensor_parallel_size=4, expert_parallel_size=4, num_redundant_experts=4)),
])
def test_logits_and_tokens_match_one_process(arch, kw, tiny_model_dir):
    """Through the engine (continuous batching, chunked prefill, prefix hits): the top-3
    log-probabilities of every generated token are the one-process ones within float32
    tolerance, and the greedy tokens are identical."""
    path = tiny_model_dir(arch)
    want_tokens, want = run(path, params=LOGPROBS)
    tokens, seen = run(path, params=LOGPROBS, **kw)
    assert tokens == want_tokens
    assert_logprobs_close(seen["logprobs"], want["logprobs"])
    assert seen["prefix_hits"] > 0 and len(seen["pids"]) == kw["tensor_parallel_size"]
    assert_gone(seen["pids"])


# ---- bad layouts: one line, before any worker starts ------------------------------------------

def test_bad_layouts_are_one_line_config_errors(smollm2_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"tensor parallel size 2 does not fit .* 9 attention heads"):
        LLM(smollm2_path, tensor_parallel_size=2)
    cases = [(dict(tensor_parallel_size=3), "tensor parallel size 3"),
             (dict(tensor_parallel_size=2, expert_parallel_size=3), "expert parallel size 3"),
             (dict(num_redundant_experts=2), "needs expert parallelism"),
             (dict(tensor_parallel_size=0), "must be an integer >= 1"),
             (dict(distributed_executor_backend="slurm"), "must be one of mp, ray")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg) as err:
            LLM(str(tiny_model_dir("llama")), **kw)
        assert "\n" not in str(err.value)


# ---- faults ----------------------------------------------------------------------------------

def test_killed_worker_fails_the_request_and_stops_the_others(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), **ENGINE, tensor_parallel_size=2)
    pids = [i["pid"] for i in llm.engine.executor.worker_info]
    engine = llm.engine
    engine.add_request("r", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL; "
                                              r"the engine stopped its 2 worker processes"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - t0 < 5
    assert_gone(pids)
    with pytest.raises(WorkerDiedError):  # and it stays dead
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


def test_worker_exception_fails_the_engine_with_its_message(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), **ENGINE, tensor_parallel_size=2)
    pids = [i["pid"] for i in llm.engine.executor.worker_info]
    with pytest.raises(WorkerDiedError, match=r"worker rank \d failed: AttributeError: .*no_such_method"):
        llm.engine.executor.collective_rpc("no_such_method")
    assert_gone(pids)


_DRIVER = """
import sys
from paraserve import LLM
llm = LLM(sys.argv[1], dtype="float32", block_size=4, max_model_len=64, threads=1,
          tensor_parallel_size=2)
print(*[i["pid"] for i in llm.engine.executor.worker_info], flush=True)
sys.stdin.read()  # hold until killed
"""


def test_killed_driver_leaves_no_workers(tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tiny_model_dir("llama"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.kill()  # no cleanup runs in the driver
        proc.wait()
        assert_gone(pids)
    finally:
        proc.kill()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_server_answers_503_when_a_worker_dies(tiny_model_dir):
    import json
    import re

    import httpx
    from server.conftest import ServerProcess

    server = ServerProcess(str(tiny_model_dir("llama")), "--tensor-parallel-size", "2", "--threads", "1",
                           "--dtype", "float32", "--block-size", "4", "--max-model-len", "256")
    try:
        pids = [int(p) for p in re.search(r"pids \[([\d, ]+)\]", "".join(server.lines)).group(1).split(",")]
        family = _descendants(server.proc.pid)  # the workers and the forkserver they came from
        assert set(pids) <= set(family)
        body = {"prompt": [1, 2, 3, 4], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it is generating
            os.kill(pids[1], signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] == 503 and "worker rank 1" in error["message"]
        assert httpx.get(server.url + "/health", timeout=5).status_code == 503
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert_gone(pids)  # the engine stopped the surviving worker itself
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert_gone(family)
    finally:
        server.stop()


def test_ray_backend_gives_the_mp_tokens(tiny_model_dir):
    ray = pytest.importorskip("ray")
    path = tiny_model_dir("llama")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local one-host cluster
    try:
        tokens, seen = run(path, tensor_parallel_size=2, distributed_executor_backend="ray")
        assert tokens == run(path, tensor_parallel_size=2, distributed_executor_backend="mp")[0]
        assert tokens == reference(path)
        assert_gone(seen["pids"])  # shutdown kills the actors
        llm = LLM(str(path), **ENGINE, tensor_parallel_size=2, distributed_executor_backend="ray")
        pids = [i["pid"] for i in llm.engine.executor.worker_info]
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match=r"Ray worker rank 0 \(pid \d+\) died; the engine stopped"):
            llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
        assert_gone(pids)
    finally:
        ray.shutdown()


class _RaySteps:
    """Stands in for the ray module in RayExecutor._get: the call refs become ready in the
    order given and raise what `errors` says; sentinel refs (an actor's death) become ready only
    from the `dead_from`-th wait on (a death Ray reports after the peer's call failed)."""

    class exceptions:
        class RayActorError(Exception):
            pass

    def __init__(self, ready, errors, dead, dead_from):
        self.ready, self.errors, self.dead, self.dead_from, self.waits = ready, errors, dead, dead_from, 0

    def wait(self, refs, num_returns=1, timeout=None):
        self.waits += 1
        alive = [r for r in self.ready if r in refs]
        if self.waits >= self.dead_from:
            alive += [r for r in self.dead if r in refs]
        return alive[:num_returns], [r for r in refs if r not in alive[:num_returns]]

    def get(self, ref):
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if ref in self.errors:
            raise self.errors[ref]
        return ref


@pytest.mark.parametrize("dead, expected", [(["s0"], r"Ray worker rank 0 \(pid 11\) died"),
                                            ([], r"Ray worker rank 1 failed: RuntimeError: Connection reset")])
def test_ray_failure_names_the_dead_peer_over_its_victim(monkeypatch, dead, expected):
    """When a rank's call fails because a peer died (its collective read a closed connection) and
    Ray reports the death a moment later, the error names the dead rank; a failure with no dead
    peer names the rank that failed."""
    from paraserve.engine import ray_executor

    monkeypatch.setattr(ray_executor, "PEER_DEATH_WAIT_S", 0.01)
    ex = ray_executor.RayExecutor.__new__(ray_executor.RayExecutor)
    ex.ray = _RaySteps(ready=["c1", "c0"], errors={"c1": RuntimeError("Connection reset by peer")},
                       dead=dead, dead_from=2)
    ex._sentinels, ex.actors, ex.world_size, ex.dead, ex._closed = ["s0", "s1"], [], 2, None, False
    ex.worker_info = [{"pid": 11}, {"pid": 12}]
    ex._pg, ex._remove_pg, ex._owns_ray = None, lambda pg: None, False
    with pytest.raises(WorkerDiedError, match=expected) as info:
        ex._get(["c0", "c1"])
    assert isinstance(info.value.__cause__, RuntimeError)  # the victim's error stays as the cause


def _reply_an_error(conn) -> None:
    conn.send(("error", (RuntimeError("Connection reset by peer"), "traceback")))
    time.sleep(30)


def _die_soon() -> None:
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("peer_dies, expected", [
    (True, r"worker rank 1 \(pid \d+\) was killed by SIGKILL"),
    (False, r"worker rank 0 failed: RuntimeError: Connection reset by peer")])
def test_mp_failure_names_the_dead_peer_over_its_victim(monkeypatch, peer_dies, expected):
    """The process executor, as Ray's above: rank 0 replies an error (its collective read a
    closed connection) before rank 1's death shows; the error names the dead rank. With no
    dead peer it names the rank that failed."""
    import multiprocessing

    from paraserve.engine import executor

    monkeypatch.setattr(executor, "PEER_DEATH_WAIT_S", 5.0 if peer_dies else 0.2)
    ctx = multiprocessing.get_context("fork")  # the children only sleep, send and die
    conns, procs = [], []
    for rank in range(2):
        here, there = ctx.Pipe()
        target, args = (_reply_an_error, (there,)) if rank == 0 else (
            (_die_soon, ()) if peer_dies else (time.sleep, (30,)))
        procs.append(ctx.Process(target=target, args=args, daemon=True))
        procs[-1].start()
        conns.append(here)
    ex = executor.MultiprocExecutor.__new__(executor.MultiprocExecutor)
    ex.procs = [executor._Proc(rank, proc, conn) for rank, (proc, conn) in enumerate(zip(procs, conns))]
    ex.world_size, ex.dead, ex._closed = 2, None, False
    ex._finalizer = lambda: executor._stop_processes(procs, 0.0)
    with pytest.raises(WorkerDiedError, match=expected) as info:
        ex._gather([0])
    assert isinstance(info.value.__cause__, RuntimeError)  # the victim's error stays as the cause
    assert not any(p.is_alive() for p in procs)


def test_server_on_a_ray_cluster_it_started_stops_cleanly(tiny_model_dir):
    """With no Ray connection open, the engine starts a local cluster from its engine thread and
    closes it from there on SIGTERM: Ray's local processes die with the thread that started
    them, so closing from another thread hung the server on a dead cluster."""
    pytest.importorskip("ray")
    import httpx
    from server.conftest import ServerProcess

    server = ServerProcess(str(tiny_model_dir("llama")), "--tensor-parallel-size", "2", "--threads", "1",
                           "--dtype", "float32", "--distributed-executor-backend", "ray")
    try:
        family = _descendants(server.proc.pid)  # the Ray workers, raylet and GCS among them
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        assert_gone(family, within=30)
    finally:
        server.stop()


def test_bench_parallel(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "parallel.json"
    cmd = [sys.executable, "-m", "paraserve.server.cli", "bench", "parallel", "--model",
           str(tiny_model_dir("mixtral")), "--dtype", "float32", "--threads", "1", "--layouts", "tp2xep2,cp2",
           "--num-prompts", "2", "--input-len", "20", "--output-len", "4", "--ring-tokens", "96",
           "--output-json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tp2xep2" in proc.stdout and "ring cp4 (2 nodes x 2)" in proc.stdout
    res = json.loads(out.read_text())["results"]
    layout = res["layouts"]["tp2xep2"]
    assert layout["identical"] and layout["world_size"] == 2
    sent = layout["comm"]["bytes_sent"]
    assert sent["all_reduce"] > 0 and sent["all_to_all"] > 0 and sent["broadcast"] > 0
    cp = res["layouts"]["cp2"]
    assert cp["identical"] and cp["comm"]["ring"]["bytes_sent"] > 0
    assert 0.0 <= cp["comm"]["ring"]["hidden_fraction"] <= 1.0
    assert [r["cp"] for r in res["ring"]] == [2, 4, 4]
    assert all(r["ok"] and 0.0 <= r["hidden_fraction"] <= 1.0 and r["bytes_sent_per_rank"] > 0
               for r in res["ring"])


# ---- context parallelism -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """The tiny Llama with room for prompts of a few thousand tokens."""
    from tiny_models import _configs, build_tokenizer
    from transformers import AutoModelForCausalLM
    import torch

    config = _configs()["llama"]
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("long_llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    build_tokenizer(path)
    return path


def _cp_prompts():
    import random

    rng = random.Random(5)
    draw = lambda n: [rng.randrange(3, 380) for _ in range(n)]  # noqa: E731
    shared = draw(60)
    first = [draw(1800), shared + draw(7), draw(5), draw(33)]  # a long prompt and short ones
    second = [shared + draw(20), first[0][:1000] + draw(9)]  # prefix-cache hits on the CP shards
    return first, second


@pytest.mark.parametrize("kw", [
    dict(context_parallel_size=2, max_num_batched_tokens=2048),  # the 1800-token prompt in one ring
    dict(context_parallel_size=4, max_num_batched_tokens=2048),  # flat ring of 4
    dict(context_parallel_size=4, cp_local_size=2, max_num_batched_tokens=700),  # two-level, chunked
    dict(context_parallel_size=2, tensor_parallel_size=2, max_num_batched_tokens=2048),  # TP 2 x CP 2
])
def test_context_parallel(kw, long_llama):
    """Prefill chunks run as zigzag ring attention, the cached context (earlier chunks, prefix
    hits) riding the ring from the striped KV shards; decodes and small chunks run replicated and
    merge the shards' partial attention by LSE. Tokens are the one-process ones and their top-3
    log-probabilities agree within float32 tolerance."""
    first, second = _cp_prompts()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    args = dict(ENGINE, max_model_len=2048, max_num_seqs=4)
    args.update(max_num_batched_tokens=kw["max_num_batched_tokens"])

    def generate(llm):
        outs = [o for batch in (first, second)
                for o in llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)]
        return [o.outputs[0].token_ids for o in outs], [_logprobs(o) for o in outs]

    with LLM(str(long_llama), **args) as ref:
        want, want_lp = generate(ref)
    with LLM(str(long_llama), **{**args, **kw}) as llm:
        got, got_lp = generate(llm)
        engine = llm.engine
        ring = engine.executor.collective_rpc("ring_chunks")[0]
        # 3 fresh prompts, a prefix hit (and 2 later chunks of the long prompt when it is chunked)
        chunked = kw["max_num_batched_tokens"] < 1800
        assert ring["chunks"] >= 4 + 2 * chunked and ring["with_context"] >= 1 + 2 * chunked
        assert engine.scheduler.kv.prefix_hits > 0
        engine.scheduler.check_integrity()
        cp = kw["context_parallel_size"]
        # a scheduler block spans the CP ranks: each rank stores block_size of its tokens
        assert engine.capacity_tokens == engine.scheduler.kv.num_blocks * ENGINE["block_size"] * cp
    assert got == want
    assert_logprobs_close(got_lp, want_lp)


def test_expert_load_metrics(tiny_model_dir):
    """/metrics exports the tokens routed to each expert and the imbalance, summed over the batch
    (read from rank 0, whose router saw every token of its tp group)."""
    import asyncio

    from paraserve.config import EngineConfig
    from paraserve.engine.async_engine import AsyncLLM
    from paraserve.server.metrics import Metrics

    engine = AsyncLLM(EngineConfig.from_kwargs(model=str(tiny_model_dir("qwen2-moe")), **ENGINE,
                                               tensor_parallel_size=2, enable_expert_parallel=True))
    try:
        metrics = Metrics(engine, engine.model_name)

        async def go():
            async for out in engine.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, "r"):
                pass

        asyncio.run(go())
        text = metrics.render().decode()
        load = engine.engine.expert_load()
        routed = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith('paraserve:expert_tokens_total{') and 'layer="0"' in line)
        assert routed == sum(load[0]) > 0  # top-k assignments of every token of layer 0
        assert 'paraserve:expert_load_imbalance{layer="0"' in text
    finally:
        engine.shutdown()


def test_cp_plan_covers_every_position_once():
    """Pure planning, no processes: over the CP ranks, a ring chunk's shares hold each new
    position once and its owner (p % cp) stores it, a ring rank carries exactly the context it
    holds, replicated tokens are stored by their owner only, and no two positions share a slot."""
    from paraserve.distributed.parallel_state import GroupInfo
    from paraserve.layers.ring_attention import PAD_POSITION
    from paraserve.worker.cp_inputs import RING_MIN_TOKENS, local_slot, plan_step

    cp, block = 4, 2  # a scheduler block holds block * cp = 8 positions
    tokens = list(range(100, 160))
    reqs = [(tokens, [7, 3, 9, 1, 4, 8, 2, 6], 0, 45, True),  # fresh ring chunk
            (tokens, [5, 0, 11, 12, 13, 14, 15, 16], 24, 30, True),  # ring chunk after cached context
            (tokens, [10, 17, 18], 20, 1, True),  # decode: replicated
            (tokens, [19, 20, 21], 0, RING_MIN_TOKENS - 1, True)]  # small chunk: replicated
    plans = [plan_step(reqs, GroupInfo("cp", cp, r, None, tuple(range(cp))), block, None) for r in range(cp)]
    for i, (_, blocks, s, n, _) in enumerate(reqs):
        ring = i < 2
        assert all((i in p.ring_requests) == ring for p in plans)
        shared, stored = [], []
        for r, p in enumerate(plans):
            if ring:
                part = p.step.rings[i]
                shared += part.positions[part.positions != PAD_POSITION].tolist()
                owned = (part.slot_of >= 0).nonzero().squeeze(1).tolist()
                assert [s + j for j in owned] == [q for q in range(s, s + n) if q % cp == r]
                assert all(part.slot_of[q - s] == local_slot(blocks, q, block, cp) for q in range(s + r, s + n, cp))
                stored += [s + j for j in owned]
                if s:
                    held = part.ctx_positions[part.ctx_positions != PAD_POSITION].tolist()
                    assert held == [q for q in range(s) if q % cp == r]
            else:
                mine = [t for t in p.step.write_tokens.tolist() if p.starts[i] <= t < p.starts[i] + n]
                assert all((s + t - p.starts[i]) % cp == r for t in mine)
                stored += [s + t - p.starts[i] for t in mine]
        if ring:
            assert sorted(shared) == list(range(s, s + n))
        assert sorted(stored) == list(range(s, s + n))
    # a sampled row's hidden state is on one rank (ring chunk) or on every rank (replicated)
    assert [sum(p.last_token[i] is not None for p in plans) for i in range(len(reqs))] == [1, 1, cp, cp]
    for r in range(cp):
        slots = [local_slot(b, q, block, cp) for _, b, s, n, _ in reqs for q in range(r, s + n, cp)]
        assert len(slots) == len(set(slots))


def test_redundant_experts_are_placed_from_a_load_history(tiny_model_dir, tmp_path):
    """A load history file ({layer: load per expert}, what engine.expert_load() returns) places
    the replicas on its hottest experts, here the last two (with no history they would go to
    experts 0 and 1); tokens stay those of one process."""
    import json

    path = tiny_model_dir("qwen2-moe")
    ref_tokens, ref_seen = run(path)
    history = tmp_path / "load.json"
    history.write_text(json.dumps({layer: [1, 2, 50, 100] for layer in ref_seen["expert_load"]}))
    kw = dict(tensor_parallel_size=2, expert_parallel_size=2, num_redundant_experts=2,
              expert_load_history=str(history))
    with LLM(str(path), **{**ENGINE, **kw}) as llm:
        tokens = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                                               GREEDY, use_tqdm=False)]
        placement = llm.engine.executor.collective_rpc("expert_placement")[0]
    assert tokens == ref_tokens
    assert placement and all(sorted(p) == [0, 1, 2, 2, 3, 3] for p in placement.values())
    with pytest.raises(ValueError, match="cannot read it"):
        LLM(str(path), **{**ENGINE, **kw, "expert_load_history": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="give --num-redundant-experts too"):
        LLM(str(path), **{**ENGINE, "tensor_parallel_size": 2, "expert_parallel_size": 2,
                          "expert_load_history": str(history)})
