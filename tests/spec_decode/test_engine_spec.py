"""Speculative decoding in the engine (contract 3: lossless; contract 5: no block leaks).

Greedy output with ngram or ReDrafter speculation equals plain decoding's, on a tiny random
Llama and on the real SmolLM2, in mixed batches where one step holds prefill chunks, plain
decodes and tree verifications. An oracle proposer that knows the greedy continuation hides the
right path in a later beam, so accepted paths leave the first beam and their K/V is moved.
"""
import asyncio
import random

import pytest
import torch

from paraserve import LLM, SamplingParams
from paraserve.config import DEFAULT_TREE_CONTEXT_BUDGET, ConfigError, SpecConfig, default_step_draft_budget
from paraserve.spec_decode.proposer import Draft, Proposer
from paraserve.spec_decode.redrafter import ReDrafter, ReDrafterConfig, save_drafter

V = 384  # the tiny models' vocabulary
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _prompts(seed=0):
    """Repetitive prompts (prompt lookup finds matches), one long enough to be chunked."""
    rng = random.Random(seed)
    short = [[rng.randrange(3, V) for _ in range(rng.randrange(4, 12))] * 3 for _ in range(3)]
    return short + [[rng.randrange(3, V) for _ in range(90)]]


ARRIVALS = [0, 0, 3, 5]  # step at which each prompt arrives: later ones prefill beside verifications


def _llm(path, spec=None, **kw):
    args = dict(dtype="float32", block_size=4, max_model_len=256, max_num_batched_tokens=32,
                threads=1)
    args.update(kw)
    if spec is not None:  # these tests batch several requests: keep speculation on for them all
        spec = {"disable_by_batch_size": 64, **spec}
    return LLM(str(path), speculative_config=spec, **args)


def _drive(llm, prompts, params, arrivals=ARRIVALS, abort=None):
    """Runs the requests, arriving at their steps; checks block accounting after every step.
    Returns (token ids per request, the scheduler outputs). abort: (step, request index)."""
    eng = llm.engine
    outs, sched = {}, []
    schedule = eng.scheduler.schedule

    def spy():
        sched.append(schedule())
        return sched[-1]

    eng.scheduler.schedule = spy
    params = params if isinstance(params, list) else [params] * len(prompts)
    step = 0
    try:
        while step <= max(arrivals) or eng.has_unfinished_requests():
            for i, (p, sp) in enumerate(zip(prompts, params)):
                if arrivals[i] == step:
                    eng.add_request(str(i), {"prompt_token_ids": p}, sp)
            if abort is not None and abort[0] == step:
                eng.abort_request([str(abort[1])])
            for o in eng.step():
                if o.finished:
                    outs[int(o.request_id)] = o
            eng.scheduler.check_integrity()
            step += 1
    finally:
        eng.scheduler.schedule = schedule
    kv = eng.scheduler.kv
    assert not kv.req_blocks and kv.pool.num_free_blocks == kv.num_blocks  # free or cached only
    return outs, sched


def _tokens(outs):
    return {i: o.outputs[0].token_ids for i, o in outs.items()}


def _mixed_step(sched):
    """Some step verified a tree while another request ran a prefill chunk."""
    return any(o.num_draft_tokens and any(n > 1 for r, n in o.num_scheduled_tokens.items()
                                          if r not in o.num_draft_tokens) for o in sched)


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the engines here run on one thread (a shared 2-core box)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(tiny):
    outs, _ = _drive(_llm(tiny), _prompts(), GREEDY)
    return _tokens(outs)


def random_drafter(path, base_model, vocab, hidden, draft_vocab=None, seed=0):
    """An untrained ReDrafter with random weights (blocks included), saved to path: it drafts
    poorly, which is all a losslessness test needs."""
    torch.manual_seed(seed)
    token_ids = None if draft_vocab is None else torch.arange(draft_vocab)
    drafter = ReDrafter(ReDrafterConfig(base_model, vocab, hidden, num_blocks=1,
                                        draft_vocab_size=draft_vocab), token_ids)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.3)
    save_drafter(drafter, str(path), dtype=torch.float32)
    return str(path)


@pytest.fixture(scope="module")
def drafter_dir(tiny, tmp_path_factory):
    return random_drafter(tmp_path_factory.mktemp("drafter"), tiny.name, V, 64)


class OracleProposer(Proposer):
    """Drafts from the known greedy continuation: beam 0 is wrong at once, beams 1 and 2 follow
    the right path for random lengths, then go wrong."""
    name = "oracle"

    def __init__(self, prompts, refs, length=4, seed=0):
        self.refs = [(tuple(p), refs[i]) for i, p in enumerate(prompts)]
        self.length = length
        self.rng = random.Random(seed)

    def propose(self, token_ids, hidden_states=None, max_nodes=None):
        return [Draft(self._beams(self._continuation(t))) for t in token_ids]

    def _continuation(self, tokens):
        for prompt, ref in self.refs:
            n = len(prompt)
            if tuple(tokens[:n]) == prompt and tokens[n:] == ref[:len(tokens) - n]:
                return ref[len(tokens) - n:][:self.length]
        return []

    def _beams(self, right):
        if not right:
            return []
        wrong = lambda t: (t + 1 + self.rng.randrange(V - 1)) % V  # noqa: E731 - never t
        a = self.rng.randrange(len(right) + 1)
        b = self.rng.randrange(a, len(right) + 1)
        cut = lambda k: right[:k] + ([wrong(right[k])] if k < len(right) else [])  # noqa: E731
        return [[wrong(right[0])] + right[1:], cut(a), cut(b)]


# ---- tiny random model ---------------------------------------------------------------------

@pytest.mark.parametrize("method,min_prob", [("ngram", None), ("redrafter", 0.0), ("redrafter", 0.3)])
def test_greedy_identical_in_mixed_batches(tiny, reference, drafter_dir, method, min_prob):
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "redrafter":  # every beam verified in full, or only its likely prefix
        spec.update(beam_width=3, drafter_path=drafter_dir, min_draft_prob=min_prob)
    llm = _llm(tiny, spec)
    outs, sched = _drive(llm, _prompts(), GREEDY)
    assert _tokens(outs) == reference
    assert llm.engine.spec_decoding_stats().num_drafts > 0
    assert _mixed_step(sched)


def _tree_sizes(llm) -> list[list[tuple[int, int]]]:
    """Spy on the speculator: per propose call (one a step), each request's (context length,
    draft nodes); 0 nodes where it got no tree."""
    spec, seen = llm.engine.worker.runner.spec, []
    propose = spec.propose

    def spy(token_ids, max_depths, hidden_states):
        trees = propose(token_ids, max_depths, hidden_states)
        seen.append([(len(t), 0 if tr is None else tr.num_nodes - 1) for t, tr in zip(token_ids, trees)])
        return trees

    spec.propose = spy
    return seen


def _greedy_tree_sizes(tiny, reference, spec) -> list[list[tuple[int, int]]]:
    """_tree_sizes over a greedy run of _prompts() with `spec`, whose output must be the reference."""
    llm = _llm(tiny, spec)
    steps = _tree_sizes(llm)
    outs, _ = _drive(llm, _prompts(), GREEDY)
    assert _tokens(outs) == reference
    return steps


def test_tree_context_budget_bounds_trees_by_context(tiny, reference, drafter_dir):
    """Nodes x context length stays within tree_context_budget: at most max(1, budget //
    context) nodes (lookup beam and drafter nodes together); 0 bounds nothing."""
    spec = {"method": "redrafter", "num_speculative_tokens": 3, "beam_width": 3,
            "drafter_path": drafter_dir, "min_draft_prob": 0.0, "step_draft_budget": 0}
    sizes = {}
    for budget in (100, 0):
        steps = _greedy_tree_sizes(tiny, reference, {**spec, "tree_context_budget": budget})
        sizes[budget] = [(c, n) for step in steps for c, n in step if n]
    assert all(n <= max(1, 100 // c) for c, n in sizes[100])
    assert any(n > max(1, 100 // c) for c, n in sizes[0])  # the bound does cut
    assert any(c > 100 for c, _ in sizes[100])  # past the budget: one node


def test_step_draft_budget_shares_nodes_among_the_requests(tiny, reference, drafter_dir):
    """A step's trees hold at most max(1, budget // requests drafting) nodes each (lookup beam and
    drafter nodes together); 0 bounds nothing; output is unchanged."""
    spec = {"method": "redrafter", "num_speculative_tokens": 3, "beam_width": 3,
            "drafter_path": drafter_dir, "min_draft_prob": 0.0, "tree_context_budget": 0}
    steps = {}
    for budget in (6, 0):
        seen = _greedy_tree_sizes(tiny, reference, {**spec, "step_draft_budget": budget})
        steps[budget] = [[n for _, n in step] for step in seen]
    assert all(n <= max(1, 6 // len(sizes)) for sizes in steps[6] for n in sizes)
    assert any(len(sizes) >= 3 for sizes in steps[6])  # several requests shared the budget
    assert any(n > max(1, 6 // len(sizes)) for sizes in steps[0] for n in sizes)  # the bound does cut


def test_accepted_paths_off_the_first_beam_keep_their_kv(tiny, reference):
    llm = _llm(tiny, {"method": "ngram"})
    llm.engine.worker.runner.spec.proposer = OracleProposer(_prompts(), reference)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    outs, sched = _drive(llm, _prompts(), params)
    assert _tokens(outs) == reference
    stats = llm.engine.spec_decoding_stats()
    assert stats.mean_accepted_length > 2  # many tokens came from verified drafts
    assert _mixed_step(sched)
    ref_outs, _ = _drive(_llm(tiny), _prompts()[:1], params, arrivals=[0])
    ref_lp, spec_lp = ref_outs[0].outputs[0].logprobs, outs[0].outputs[0].logprobs
    assert len(spec_lp) == len(ref_lp) == 32
    for a, b in zip(ref_lp, spec_lp):
        assert a.keys() == b.keys()
        for tok in a:
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4 and a[tok].rank == b[tok].rank


def test_tight_budget_and_cache_cut_trees_and_preempt(tiny, reference):
    """A small token budget verifies only the first nodes of some trees; a cache too small for
    all four requests preempts (and recomputes) some of them in the middle of speculation."""
    llm = _llm(tiny, {"method": "ngram"}, max_num_batched_tokens=24, num_gpu_blocks_override=32)
    runner = llm.engine.worker.runner
    runner.spec.proposer = OracleProposer(_prompts(), reference)
    cut = []
    scheduled_tree = runner._scheduled_tree

    def spy(st, tree, k, n):
        cut.append(tree is not None and tree.num_nodes > 1 + k)
        return scheduled_tree(st, tree, k, n)

    runner._scheduled_tree = spy
    outs, _ = _drive(llm, _prompts(), GREEDY, arrivals=[0, 0, 0, 0])
    assert _tokens(outs) == reference
    assert llm.engine.scheduler.num_preemptions > 0 and any(cut)


def test_stops_inside_accepted_drafts(tiny, reference):
    """EOS-like stop tokens, max_tokens and stop strings cut a multi-token step where plain
    decoding would have stopped."""
    llm_plain = _llm(tiny)
    llm_spec = _llm(tiny, {"method": "ngram"})
    llm_spec.engine.worker.runner.spec.proposer = OracleProposer(_prompts(), reference)
    full = llm_plain.tokenizer.decode(reference[2], skip_special_tokens=True)
    text = full[len(full) // 3:len(full) // 3 + 2]  # a stop string the output runs into
    params = [SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[reference[0][9]]),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[text]),
              GREEDY]
    plain, _ = _drive(llm_plain, _prompts(), params)
    spec, _ = _drive(llm_spec, _prompts(), params)
    for i in plain:
        a, b = plain[i].outputs[0], spec[i].outputs[0]
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
               (b.token_ids, b.text, b.finish_reason, b.stop_reason)
    assert len(spec[0].outputs[0].token_ids) <= 10 and len(spec[1].outputs[0].token_ids) == 11
    assert spec[2].outputs[0].finish_reason == "stop"
    assert llm_spec.engine.spec_decoding_stats().mean_accepted_length > 2


def test_abort_mid_speculation_frees_blocks(tiny, reference):
    llm = _llm(tiny, {"method": "ngram"})
    llm.engine.worker.runner.spec.proposer = OracleProposer(_prompts(), reference)
    outs, sched = _drive(llm, _prompts(), GREEDY, abort=(4, 0))  # _drive checks the blocks
    assert 0 not in outs and any("0" in o.num_draft_tokens for o in sched[:4])
    assert all(_tokens(outs)[i] == reference[i] for i in outs)


def test_per_request_opt_out_and_penalties_decode_plainly(tiny, reference):
    llm = _llm(tiny, {"method": "ngram"})
    llm.engine.worker.runner.spec.proposer = OracleProposer(_prompts(), reference)
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, speculative=False),
              SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, repetition_penalty=1.3),
              GREEDY, GREEDY]
    outs, sched = _drive(llm, _prompts(), params)
    drafted = {r for o in sched for r in o.num_draft_tokens}
    assert drafted == {"2", "3"}
    assert _tokens(outs)[0] == reference[0]


def test_speculation_turns_off_when_the_batch_is_large(tiny, reference):
    llm = _llm(tiny, {"method": "ngram", "disable_by_batch_size": 2})
    llm.engine.worker.runner.spec.proposer = OracleProposer(_prompts(), reference)
    outs, sched = _drive(llm, _prompts(), GREEDY, arrivals=[0, 0, 0, 0])
    assert _tokens(outs) == reference
    for prev, o in zip(sched, sched[1:]):
        if len(o.num_scheduled_tokens) > 2:  # that many running at the end of the step
            assert not o.propose_drafts
            if len(prev.num_scheduled_tokens) > 2:  # and at its start
                assert not o.num_draft_tokens
        if o.num_draft_tokens:
            assert prev.propose_drafts
    assert any(o.num_draft_tokens for o in sched)  # once requests finish, it turns back on


def test_seeded_sampling_with_speculation_is_reproducible(tiny):
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7 + i, max_tokens=24,
                             ignore_eos=True) for i in range(4)]
    params[3] = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # greedy beside them
    # prefix caching off: a cache hit would change the second run's batching, so the step's draft
    # budget would be shared differently and other drafts verified; a seed's tokens depend on the
    # drafts (their distribution does not)
    llm = _llm(tiny, {"method": "ngram", "prompt_lookup_min": 1}, enable_prefix_caching=False)
    runs = []
    for _ in range(2):
        outs, _ = _drive(llm, _prompts(), params)
        runs.append(_tokens(outs))
    assert runs[0] == runs[1]
    assert llm.engine.spec_decoding_stats().num_drafts > 0


def test_metrics_report_speculation(tiny, reference):
    from paraserve.engine.async_engine import AsyncLLM
    from paraserve.server.metrics import Metrics

    llm = _llm(tiny, {"method": "ngram"})
    llm.engine.worker.runner.spec.proposer = OracleProposer(_prompts(), reference)
    engine = AsyncLLM(llm.engine.config, engine=llm.engine)
    metrics = Metrics(engine, "tiny")

    async def run():
        async for _ in engine.generate({"prompt_token_ids": _prompts()[0]}, GREEDY, "r"):
            pass

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    text = metrics.render().decode()
    stats = llm.engine.spec_decoding_stats()
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("paraserve:spec_decode")}
    assert values["paraserve:spec_decode_num_drafts_total"] == stats.num_drafts > 0
    assert values["paraserve:spec_decode_num_accepted_tokens_total"] == stats.num_accepted_tokens
    assert values["paraserve:spec_decode_num_draft_tokens_total"] == stats.num_draft_tokens
    assert values["paraserve:spec_decode_mean_accepted_length"] == pytest.approx(stats.mean_accepted_length)
    assert values["paraserve:spec_decode_acceptance_rate"] == pytest.approx(stats.acceptance_rate)


# ---- configuration errors ------------------------------------------------------------------

def test_bad_speculative_config_is_a_one_line_error(capsys):
    from paraserve.server.cli import main

    for bad, msg in [("{method: ngram}", "not valid JSON"), ('{"method": "eagle"}', "unknown method"),
                     ('{"method": "ngram", "beam_width": 2}', "not an option of method 'ngram'"),
                     ('{"method": "ngram", "k": 2}', "unknown key(s) 'k'"),
                     ('{"method": "ngram", "num_speculative_tokens": 0}', "integer >= 1"),
                     ('{"method": "redrafter", "min_draft_prob": 1}', "min_draft_prob must be a number in [0, 1)"),
                     ('{"method": "redrafter", "min_draft_prob": "0.1"}', "min_draft_prob must be a number"),
                     ('{"method": "ngram", "min_draft_prob": 0.1}', "not an option of method 'ngram'"),
                     ('{"method": "ngram", "lookup_beam": true}', "not an option of method 'ngram'"),
                     ('{"method": "redrafter", "lookup_beam": 1}', "lookup_beam must be true or false"),
                     ('{"method": "redrafter", "drafter_int8": "yes"}', "drafter_int8 must be true or false"),
                     ('{"method": "ngram", "drafter_int8": true}', "not an option of method 'ngram'"),
                     ('{"method": "redrafter", "lookup_beam": false, "prompt_lookup_max": 4}',
                      "which lookup_beam false turns off"),
                     ('{"method": "redrafter", "lookup_beam": false, "lookup_length": 6}',
                      "which lookup_beam false turns off"),
                     ('{"method": "ngram", "lookup_length": 6}', "not an option of method 'ngram'"),
                     ('{"method": "redrafter", "lookup_length": 0}', "lookup_length must be an integer >= 1"),
                     ('{"method": "ngram", "tree_context_budget": -1}', "tree_context_budget must be an integer >= 0"),
                     ('{"method": "redrafter", "tree_context_budget": "4k"}', "tree_context_budget must be"),
                     ('{"method": "ngram", "step_draft_budget": -2}', "step_draft_budget must be an integer >= 0")]:
        assert main(["generate", "--prompt", "hi", "--speculative-config", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1 and msg in err, err
    with pytest.raises(ConfigError, match="disagree"):
        SpecConfig(method="redrafter", num_speculative_tokens=3, beam_length=5)
    assert SpecConfig(method="redrafter", num_speculative_tokens=3).beam_length == 3
    assert SpecConfig(method="redrafter").min_draft_prob == 0.05
    assert SpecConfig(method="redrafter", min_draft_prob=0).min_draft_prob == 0.0
    on = SpecConfig(method="redrafter")
    assert (on.lookup_beam, on.prompt_lookup_min, on.prompt_lookup_max, on.lookup_length) == (True, 2, 5, 8)
    ngram = SpecConfig(method="ngram")
    assert (ngram.prompt_lookup_min, ngram.prompt_lookup_max, ngram.num_speculative_tokens) == (1, 5, 8)
    assert SpecConfig(method="redrafter", lookup_length=3).lookup_length == 3
    assert SpecConfig(method="redrafter", prompt_lookup_min=1).prompt_lookup_min == 1
    assert SpecConfig(method="redrafter", prompt_lookup_max=1).prompt_lookup_min == 1  # not above the max
    off = SpecConfig(method="redrafter", lookup_beam=False)
    assert (off.lookup_beam, off.prompt_lookup_min, off.prompt_lookup_max, off.lookup_length) == (False, None, None,
                                                                                                  None)
    assert SpecConfig(method="redrafter", prompt_lookup_min=2).prompt_lookup_max == 5
    assert SpecConfig(method="redrafter", prompt_lookup_min=7).prompt_lookup_max == 7  # not below the min
    assert SpecConfig(method="ngram").tree_context_budget == DEFAULT_TREE_CONTEXT_BUDGET
    assert SpecConfig(method="ngram", tree_context_budget=0).tree_context_budget == 0
    assert SpecConfig(method="ngram").step_draft_budget == default_step_draft_budget()
    assert SpecConfig(method="ngram", step_draft_budget=5).step_draft_budget == 5
    assert SpecConfig(method="ngram", disable_by_batch_size=3).disable_by_batch_size == 3


@pytest.mark.parametrize("flags, running, budget", [("flags\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile", 4, 16),
                                                     ("flags\t: fpu avx512f avx512_bf16 avx512_vnni", 2, 7)])
def test_batch_defaults_follow_the_cpu(monkeypatch, flags, running, budget):
    """disable_by_batch_size and step_draft_budget default to what was measured with and
    without AMX."""
    from paraserve.ops import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    config = SpecConfig(method="redrafter")
    assert (config.disable_by_batch_size, config.step_draft_budget) == (running, budget)


def test_cli_generate_and_api_opt_out(tiny, capsys):
    import json

    from paraserve.server.cli import main
    from paraserve.server.protocol import ChatCompletionRequest

    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    assert main(["generate", str(tiny), "--prompt", "The quick brown fox", "--max-tokens", "6", "--ignore-eos",
                 "--dtype", "float32", "--threads", "1", "--json", "--speculative-config", spec]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) == 6
    body = {"messages": [{"role": "user", "content": "hi"}], "speculative": False}
    assert ChatCompletionRequest(**body).sampling_params(8, None).speculative is False
    assert ChatCompletionRequest(messages=body["messages"]).sampling_params(8, None).speculative


def test_redrafter_without_a_drafter_says_how_to_train_one(tiny):
    with pytest.raises(ValueError, match="no drafter ships .*paraserve train-drafter"):
        _llm(tiny, {"method": "redrafter"})


# ---- the real SmolLM2 ----------------------------------------------------------------------

def test_smollm2_greedy_identical_with_speculation(smollm2_path, tmp_path):
    """One model load for both methods: the plain reference is the per-request opt-out, and the
    ngram speculator replaces the ReDrafter one (what the worker would build for it)."""
    from paraserve.spec_decode.speculator import Speculator

    path = random_drafter(tmp_path / "drafter", "SmolLM2-135M-Instruct", 49152, 576, draft_vocab=2048)
    llm = LLM(dtype="float32", max_model_len=512, kv_cache_memory="64MiB", max_num_batched_tokens=48,
              threads=1, speculative_config={"method": "redrafter", "beam_width": 2, "beam_length": 3,
                                             "drafter_path": path})
    chats = ["What is the capital of France?", "List three prime numbers."]
    prompts = [llm.apply_chat_template([{"role": "user", "content": c}]) for c in chats]
    prompts.append(llm.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return"))
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, speculative=False)
    spec = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    arrivals = [0, 2, 4]
    ref, _ = _drive(llm, prompts, plain, arrivals)
    out, sched = _drive(llm, prompts, spec, arrivals)
    assert _tokens(out) == _tokens(ref) and _mixed_step(sched)
    runner = llm.engine.worker.runner
    runner.spec = Speculator(SpecConfig(method="ngram"), runner.model, "SmolLM2-135M-Instruct", 49152)
    before = llm.engine.spec_decoding_stats().num_accepted_tokens
    out, _ = _drive(llm, prompts, spec, arrivals)
    assert _tokens(out) == _tokens(ref)
    assert llm.engine.spec_decoding_stats().num_accepted_tokens > before


def test_shipped_drafter_works_out_of_the_box_in_bf16(smollm2_path):
    """`{"method": "redrafter"}` alone loads the drafter shipped for the default model; in bf16
    (dtype auto) greedy output is the plain output, and the drafter's tokens are accepted."""
    llm = LLM(max_model_len=512, kv_cache_memory="64MiB", speculative_config={"method": "redrafter"})
    prompts = [llm.apply_chat_template([{"role": "user", "content": c}])
               for c in ("Why is the sky blue?", "Write a short poem about the sea.")]
    plain = SamplingParams(temperature=0, max_tokens=48, speculative=False)
    spec = SamplingParams(temperature=0, max_tokens=48)
    ref, _ = _drive(llm, prompts, plain, [0, 0])
    out, _ = _drive(llm, prompts, spec, [0, 0])
    assert _tokens(out) == _tokens(ref)
    stats = llm.engine.spec_decoding_stats()
    assert stats.num_accepted_tokens > 0 and stats.num_drafts > 0
