"""Speculative steps in the scheduler, driven with hand-made runner outputs: drafts are counted as
tokens, rejected ones give their slots back, and block accounting stays exact."""
from paraserve.config import CacheConfig, SchedulerConfig, SpecConfig
from paraserve.core.outputs import ModelRunnerOutput
from paraserve.core.request import Request, RequestStatus
from paraserve.core.scheduler import Scheduler
from paraserve.sampling_params import SamplingParams

BS = 4


def make_sched(num_blocks=32, budget=64, max_running=8, caching=True):
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
                     CacheConfig(block_size=BS, enable_prefix_caching=caching), num_blocks,
                     max_model_len=1024, spec=SpecConfig(method="ngram", disable_by_batch_size=max_running))


def req(rid, prompt, max_tokens=50, **kw):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw), 1024)


def step(s, sampled=None, drafts=None):
    """One step; `sampled` and `drafts` are what the fake runner returns per request."""
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled or {}, num_draft_tokens=drafts or {}))
    s.check_integrity()
    return out


def held(s, rid):
    return len(s.kv.req_blocks[rid])


def test_drafts_are_scheduled_verified_and_rejected_slots_released():
    s = make_sched()
    s.add_request(req("a", list(range(10, 16))))  # 6 prompt tokens
    step(s, {"a": [7]}, {"a": 5})
    r = s.requests["a"]
    assert (r.num_computed_tokens, r.num_draft_tokens, held(s, "a")) == (6, 5, 2)
    out = s.schedule()  # the last token and its 5 drafts: slots for 12 tokens
    assert out.num_scheduled_tokens == {"a": 6} and out.num_draft_tokens == {"a": 5}
    assert out.propose_drafts and held(s, "a") == 3
    s.update_from_output(out, ModelRunnerOutput({"a": [8]}))  # nothing accepted: the bonus only
    s.check_integrity()
    assert r.num_computed_tokens == 7 and r.output_token_ids == [7, 8] and held(s, "a") == 2
    assert r.num_draft_tokens == 0
    step(s, {"a": [1]}, {"a": 3})  # a plain decode, then 3 drafts
    out = step(s, {"a": [2, 3, 4, 5]})  # all 3 accepted + bonus
    assert out.num_scheduled_tokens == {"a": 4}
    assert r.num_computed_tokens == 12 and r.num_tokens == 13 and held(s, "a") == 3
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 8, 3)
    assert stats.acceptance_rate == 3 / 8 and stats.mean_accepted_length == (3 + 2) / 2


def test_only_verified_blocks_are_prefix_cached():
    s = make_sched()
    s.add_request(req("a", list(range(10, 16))))
    step(s, {"a": [7]}, {"a": 9})
    step(s, {"a": [8, 9]})  # 1 of 9 drafts accepted: 8 computed, 2 full verified blocks
    assert s.requests["a"].num_computed_tokens == 8
    blocks = s.kv.req_blocks["a"]
    assert len(blocks) == 2 and all(b.block_hash is not None for b in blocks)
    assert len(s.kv.pool.cached) == 2
    # the hashes are those of the verified tokens: a new request with that prefix hits them
    s.add_request(req("b", list(range(10, 16)) + [7, 8, 9]))
    out = s.schedule()
    assert out.new_requests[0].num_computed_tokens == 8


def test_budget_truncates_drafts_and_decodes_come_first():
    s = make_sched(budget=8)
    s.add_request(req("a", [1, 2, 3]))
    step(s, {"a": [7]}, {"a": 10})
    s.add_request(req("b", list(range(100, 120))))
    out = step(s, {"a": [8]})
    assert out.num_draft_tokens == {"a": 7} and out.num_scheduled_tokens == {"a": 8}
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 7}  # no drafts left: a prefill chunk fits


def test_drafts_are_dropped_before_anyone_is_preempted():
    s = make_sched(num_blocks=4)
    s.add_request(req("a", list(range(7))))  # 2 blocks
    s.add_request(req("b", list(range(50, 54))))  # 1 block
    step(s, {"a": [7], "b": [8]}, {"a": 8, "b": 1})
    out = step(s, {"a": [1], "b": [2]})
    assert out.num_draft_tokens == {"b": 1}  # a's 9 tokens need 2 more blocks: drafts dropped
    assert not out.preempted_req_ids


def test_large_batch_turns_speculation_off():
    s = make_sched(max_running=1)
    s.add_request(req("a", [1, 2, 3], max_tokens=3))
    s.add_request(req("b", [4, 5, 6]))
    out = step(s, {"a": [7], "b": [8]}, {"a": 2, "b": 2})
    assert not out.propose_drafts
    out = step(s, {"a": [9], "b": [9]})
    assert not out.num_draft_tokens  # two running: drafts held but not verified
    out = step(s, {"a": [1], "b": [2]}, {"b": 2})  # a finishes (max_tokens 3)
    assert out.propose_drafts is False and "a" not in s.requests
    out = step(s, {"b": [3, 4, 5]})
    assert out.propose_drafts and out.num_draft_tokens == {"b": 2}


def test_stop_inside_accepted_drafts_truncates_and_frees():
    s = make_sched()
    r = req("a", list(range(10, 16)), max_tokens=20, stop_token_ids=[99])
    s.add_request(r)
    step(s, {"a": [7]}, {"a": 4})
    out = s.schedule()
    results = s.update_from_output(out, ModelRunnerOutput({"a": [8, 99, 9, 10, 11]}))
    assert results[0][1] == [8, 99] and r.output_token_ids == [7, 8, 99]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 99
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks
    # max_tokens cuts a verification's tokens the same way
    r2 = req("b", list(range(10, 16)), max_tokens=3)
    s.add_request(r2)
    step(s, {"b": [7]}, {"b": 4})
    step(s, {"b": [8, 9, 10, 11, 12]})
    assert r2.output_token_ids == [7, 8, 9] and r2.status == RequestStatus.FINISHED_LENGTH
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_abort_and_preemption_mid_speculation():
    s = make_sched()
    s.add_request(req("a", list(range(10, 16))))
    step(s, {"a": [7]}, {"a": 6})
    out = s.schedule()  # a verification is in flight...
    assert out.num_draft_tokens == {"a": 6}
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # ...and the client goes away
    s.update_from_output(out, ModelRunnerOutput({"a": [1, 2, 3]}))
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks and not s.kv.req_blocks
    assert "a" in s.schedule().finished_req_ids

    s = make_sched(num_blocks=5)
    s.add_request(req("old", list(range(8))))
    s.add_request(req("new", list(range(100, 108))))
    step(s, {"old": [1], "new": [2]}, {"old": 1, "new": 3})
    out = step(s, {"old": [3, 4]})  # old's verification needs a block: new is preempted
    assert out.preempted_req_ids == {"new"}
    new = s.requests["new"]
    assert new.num_draft_tokens == 0 and new.num_computed_tokens == 0
    assert not s.kv.req_blocks.get("new")
