"""`paraserve bench prefix`: a long shared system prompt, then short user turns, one at a time.
Time to first token of each turn with prefix caching (after a warm-up request has filled the
cache) and without it, and transformers prefilling the whole prompt every turn."""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Optional, Sequence

from paraserve.bench.report import Report, ratio, verdict


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--prefix-len", type=int, default=1000, help="shared system prompt tokens (default: 1000)")
    g.add_argument("--num-turns", type=int, default=8, help="timed user turns (default: 8)")
    g.add_argument("--turn-len", type=int, default=20, help="tokens per user turn (default: 20)")
    g.add_argument("--max-tokens", type=int, default=4, help="tokens generated per turn (default: 4)")


def _engine_run(args: argparse.Namespace, caching: bool, prefix: Sequence[int],
                turns: Sequence[Sequence[int]], warm_turn: Sequence[int]) -> tuple[dict, Any]:
    """TTFT of every turn on a fresh engine; returns the figures and what the baseline needs."""
    from tqdm import tqdm

    from paraserve.bench import common
    from paraserve.bench.latency import time_request
    from paraserve.sampling_params import SamplingParams

    llm = common.make_llm(args, enable_prefix_caching=caching)
    common.warmup_engine(llm, common.engine_token_ids(llm))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engine, kv = llm.engine, llm.engine.scheduler.kv
    if len(prefix) + args.turn_len + args.max_tokens > engine.max_model_len:
        raise ValueError("--prefix-len + --turn-len + --max-tokens exceed "
                         f"--max-model-len {engine.max_model_len}")
    # the first request with the system prompt fills the cache (and warms this prompt length)
    time_request(engine, [*prefix, *warm_turn], params)
    hits0, queries0 = kv.prefix_hits, kv.prefix_queries
    label = f"paraserve, caching {'on' if caching else 'off'}"
    ttft = [time_request(engine, [*prefix, *t], params).ttft_s
            for t in tqdm(turns, desc=label, unit="turn", dynamic_ncols=True)]
    out = {"ttft_s": ttft, "ttft_s_mean": statistics.fmean(ttft), "ttft_s_median": statistics.median(ttft),
           "prefix_hits": kv.prefix_hits - hits0, "prefix_queries": kv.prefix_queries - queries0,
           "prefix_hits_incl_warmup": kv.prefix_hits, "prefix_queries_incl_warmup": kv.prefix_queries}
    meta = (engine.worker.dtype, engine.worker.device, engine.source, engine.model_name)
    del llm, engine, kv
    common.free_memory()
    return out, meta


def _hf_run(source: Any, dtype: Any, device: Any, prefix: Sequence[int], turns: Sequence[Sequence[int]],
            warm_turn: Sequence[int], max_tokens: int) -> dict:
    from tqdm import tqdm

    from paraserve.bench import hf_baseline
    from paraserve.bench.workload import BenchRequest

    model = hf_baseline.load_hf_model(source, dtype, device)
    hf_baseline.generate_batch(model, [BenchRequest((*prefix, *warm_turn), max_tokens)])
    ttft = [hf_baseline.generate_batch(model, [BenchRequest((*prefix, *t), max_tokens)])[0]
            for t in tqdm(turns, desc="transformers", unit="turn", dynamic_ncols=True)]
    return {"ttft_s": ttft, "ttft_s_mean": statistics.fmean(ttft), "ttft_s_median": statistics.median(ttft)}


def run(args: argparse.Namespace) -> Report:
    from paraserve.bench import common
    from paraserve.bench.report import machine_info
    from paraserve.bench.workload import prefix_workload
    from paraserve.models.loader import load_hf_config, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    token_ids = common.prompt_token_ids(load_tokenizer(source), load_hf_config(source).vocab_size)
    prefix, (warm_turn, *turns) = prefix_workload(args.prefix_len, args.num_turns + 1, args.turn_len,
                                                  token_ids, args.seed)
    on, (dtype, device, source, name) = _engine_run(args, True, prefix, turns, warm_turn)
    off, _ = _engine_run(args, False, prefix, turns, warm_turn)
    hf = _hf_run(source, dtype, device, prefix, turns, warm_turn, args.max_tokens) if args.baseline else None
    speedup = ratio(off["ttft_s_mean"], on["ttft_s_mean"])
    rows = [_row("paraserve, prefix caching on", on, off, hf),
            _row("paraserve, prefix caching off", off, off, hf)]
    if hf:
        rows.append(_row("transformers (full prefill every turn)", hf, off, None))
    notes = [f"workload: a {args.prefix_len}-token system prompt of random token ids, then {args.num_turns} "
             f"turns of {args.turn_len} tokens, one at a time, {args.max_tokens} greedy tokens each, "
             f"seed {args.seed}",
             "each engine first serves one warm-up turn (which fills the prefix cache when caching is on); "
             "hit rate: the engine's prefix_hits / prefix_queries over the timed turns, in prompt tokens"]
    results = {"caching_on": on, "caching_off": off, "transformers": hf, "speedup_mean_ttft": speedup,
               "ratio_vs_transformers": ratio(on["ttft_s_mean"], hf["ttft_s_mean"]) if hf else None}
    return Report("prefix", machine_info(common.dtype_name(dtype), name), common.config_of(args), _HEADERS,
                  rows, results, notes)


_HEADERS = ["run", "TTFT mean (ms)", "TTFT median (ms)", "speedup vs caching off", "vs transformers",
            "prefix hit rate"]


def _row(label: str, r: dict, off: dict, hf: Optional[dict]) -> list:
    speedup = ratio(off["ttft_s_mean"], r["ttft_s_mean"])
    vs_hf = verdict(ratio(r["ttft_s_mean"], hf["ttft_s_mean"]), higher_is_better=False) if hf else "-"
    queries = r.get("prefix_queries")
    hit = f"{r['prefix_hits'] / queries:.1%} ({r['prefix_hits']}/{queries})" if queries else "-"
    return [label, r["ttft_s_mean"] * 1000, r["ttft_s_median"] * 1000,
            f"{speedup:.2f}x" if speedup else "-", vs_hf, hit]
