"""Scheduler and KV cache manager driven directly with hand-made runner outputs."""
import pytest

from paraserve.config import CacheConfig, SchedulerConfig
from paraserve.core.kv_cache_manager import KVCacheManager
from paraserve.core.outputs import ModelRunnerOutput
from paraserve.core.request import Request, RequestStatus
from paraserve.core.scheduler import Scheduler
from paraserve.sampling_params import SamplingParams


def make_sched(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=True, chunked=True):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     enable_chunked_prefill=chunked),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                     num_blocks, max_model_len=1024)


def req(rid, prompt, max_tokens=4, priority=0, **kw):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, priority=priority, **kw), 1024)


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = {}
    for rid, n in out.num_scheduled_tokens.items():
        r = sched.requests[rid]
        if r.num_computed_tokens >= r.num_tokens:
            sampled[rid] = [token]
    sched.update_from_output(out, ModelRunnerOutput(sampled))
    sched.check_integrity()
    return out


def test_decodes_and_prefill_chunks_share_a_step():
    s = make_sched(budget=10)
    s.add_request(req("a", list(range(3))))
    run_step(s)  # a prefilled, has its first token
    s.add_request(req("b", list(range(100, 130))))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}  # decode first, then a prefill chunk
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    assert s.requests["b"].num_computed_tokens == 18


def test_chunked_prefill_off_waits_for_room():
    s = make_sched(budget=10, chunked=False)
    s.add_request(req("big", list(range(20))))
    out = s.schedule()
    assert out.is_empty


def test_max_num_seqs_limits_running():
    s = make_sched(max_seqs=2)
    for i in range(4):
        s.add_request(req(str(i), [i, i + 1]))
    out = run_step(s)
    assert set(out.num_scheduled_tokens) == {"0", "1"}
    assert len(s.waiting) == 2


def test_priority_orders_admission():
    s = make_sched(max_seqs=1)
    s.add_request(req("low", [1, 2], priority=5))
    s.add_request(req("high", [3, 4], priority=-1))
    out = run_step(s)
    assert list(out.num_scheduled_tokens) == ["high"]


def test_finishes_on_max_tokens_and_frees_blocks():
    s = make_sched()
    s.add_request(req("a", [1, 2, 3], max_tokens=3))
    for _ in range(3):
        run_step(s)
    assert not s.has_unfinished()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_eos_and_stop_token_ids_finish_unless_ignore_eos():
    s = make_sched()
    r = req("a", [1, 2], max_tokens=10)
    r.params.eos_token_id = 7
    s.add_request(r)
    run_step(s, token=7)
    assert r.status == RequestStatus.FINISHED_STOPPED
    r2 = req("b", [1, 2], max_tokens=3, ignore_eos=True)
    r2.params.eos_token_id = 7
    s.add_request(r2)
    run_step(s, token=7)
    assert r2.status == RequestStatus.RUNNING
    r3 = req("c", [1, 2], max_tokens=10, stop_token_ids=[9], min_tokens=2)
    s.add_request(r3)
    run_step(s, token=9)
    assert r3.status == RequestStatus.RUNNING  # min_tokens not reached
    run_step(s, token=9)
    assert r3.status == RequestStatus.FINISHED_STOPPED and r3.stop_reason == 9


def test_prefix_cache_hit_skips_computed_blocks():
    s = make_sched(block_size=4)
    prompt = list(range(10))
    s.add_request(req("a", prompt, max_tokens=1))
    run_step(s)
    assert not s.has_unfinished()
    s.add_request(req("b", prompt + [99], max_tokens=1))
    out = s.schedule()
    assert out.new_requests[0].num_computed_tokens == 8  # two full blocks reused
    assert out.num_scheduled_tokens["b"] == 3
    assert s.kv.prefix_hits == 8


def test_full_prompt_hit_still_computes_last_token():
    s = make_sched(block_size=4)
    prompt = list(range(8))
    s.add_request(req("a", prompt, max_tokens=1))
    run_step(s)
    s.add_request(req("b", prompt, max_tokens=1))
    out = s.schedule()
    assert out.num_scheduled_tokens["b"] == 4  # block 1 recomputed so the last logits exist


def test_preemption_frees_newest_and_recomputes():
    s = make_sched(num_blocks=6, block_size=4, budget=64)
    s.add_request(req("old", list(range(8)), max_tokens=20))
    s.add_request(req("new", list(range(100, 108)), max_tokens=20))
    run_step(s)  # 2 + 2 blocks... then decodes need more
    preempted = set()
    for _ in range(10):
        out = run_step(s)
        preempted |= out.preempted_req_ids
    assert "new" in preempted and "old" not in preempted
    assert s.num_preemptions >= 1
    new = s.requests["new"]
    assert new.num_preemptions >= 1


def test_abort_frees_blocks():
    s = make_sched()
    s.add_request(req("a", list(range(12)), max_tokens=50))
    run_step(s)
    assert s.kv.pool.num_free_blocks < s.kv.num_blocks
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks
    out = s.schedule()
    assert "a" in out.finished_req_ids


def test_prompt_too_big_for_cache_is_rejected():
    s = make_sched(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("a", list(range(20))))


def test_lru_eviction_of_cached_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(a, 5) is not None
    a.num_computed_tokens = 5
    kv.cache_blocks(a, 5)
    kv.free(a)
    kv.check_integrity(set())
    assert len(kv.pool.cached) == 2
    b = req("b", [9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks: evicts both cached ones
    assert kv.allocate_slots(b, 7) is not None
    assert len(kv.pool.cached) == 0
    kv.check_integrity({"b"})


def test_shared_blocks_are_ref_counted():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_blocks(a, 5)
    b = req("b", [1, 2, 3, 4, 6])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4
    kv.allocate_slots(b, 1, blocks)
    assert kv.req_blocks["a"][0] is kv.req_blocks["b"][0]
    assert kv.req_blocks["a"][0].ref_cnt == 2
    kv.check_integrity({"a", "b"})
    kv.free(a)
    kv.free(b)
    kv.check_integrity(set())
