"""`paraserve bench parallel`: each parallel layout through the engine against one process.

For every layout (e.g. tp3, tp2xep2) the same greedy workload runs on the one-process engine and
on the layout's worker processes: the tokens must be identical (the command exits 1 otherwise).
Rank 0's collectives are counted over the timed run and reported as bytes sent per engine step,
per collective. Then the ring-attention kernel runs in CP processes on a long random sequence
(flat ring, and the two-level BurstAttention ring at cp 4): its error against plain attention,
bytes each rank sends per call, and the fraction of the ring's transfer time hidden behind the
block computes (RingStats; exact on CPU/gloo).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Optional

from paraserve.bench.report import Report

_COLLECTIVES = {"all_reduce": ("all_reduce",), "all_gather": ("all_gather",),
                "all_to_all": ("all_to_all", "all_to_all (counts)"),
                "broadcast": ("broadcast", "broadcast (objects)")}


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--layouts", default=None,
                   help="comma-separated layouts, each tpN[xcpN][xepN][xrN] (r: redundant experts), "
                        "e.g. tp3 or tp2,cp2,tp2xep2; default: the tensor parallel sizes up to 4 that "
                        "fit the model, cp2, and tp2xep2 for MoE models")
    g.add_argument("--num-prompts", type=int, default=6, help="requests (default: 6)")
    g.add_argument("--input-len", type=int, default=48, help="prompt tokens (default: 48)")
    g.add_argument("--output-len", type=int, default=16, help="greedy tokens per request (default: 16)")
    g.add_argument("--ring-tokens", type=int, default=2048,
                   help="sequence length of the ring-attention measurement; 0 skips it (default: 2048)")


def parse_layout(text: str) -> dict[str, Any]:
    """'tp2xep2xr2' -> engine arguments."""
    names = {"tp": "tensor_parallel_size", "ep": "expert_parallel_size", "cp": "context_parallel_size",
             "r": "num_redundant_experts"}
    out: dict[str, Any] = {}
    for part in text.strip().lower().split("x"):
        key = part.rstrip("0123456789")
        if key not in names or not part[len(key):]:
            raise ValueError(f"cannot read layout {text!r}: use parts like tp2, ep2, r2 joined by x")
        out[names[key]] = int(part[len(key):])
    return out


def default_layouts(hf_config) -> list[str]:
    from paraserve.config import ConfigError
    from paraserve.distributed.parallel_state import ParallelLayout
    from paraserve.models.registry import check_parallel

    fits = []
    for tp in (2, 3, 4):
        try:
            check_parallel(hf_config, ParallelLayout(tp, tp=tp))
            fits.append(f"tp{tp}")
        except ConfigError:
            pass
    moe = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
    if moe and "tp2" in fits:
        fits.insert(1, "tp2xep2")
    return fits + ["cp2"]


def _run_engine(args: argparse.Namespace, prompts: list[list[int]], **layout: Any) -> dict[str, Any]:
    from paraserve.bench import common
    from paraserve.sampling_params import SamplingParams

    world = layout.get("tensor_parallel_size", 1) * layout.get("context_parallel_size", 1)
    if layout.get("context_parallel_size", 1) > 1:  # each prompt of the workload in one ring
        layout.setdefault("max_num_batched_tokens", max(args.max_num_batched_tokens, args.input_len))
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    llm = common.make_llm(args, threads=threads, **layout)
    try:
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        common.warmup_engine(llm, common.engine_token_ids(llm))
        engine.executor.collective_rpc("comm_stats", True)  # reset every rank's counters
        for i, p in enumerate(prompts):
            engine.add_request(f"p{i}", {"prompt_token_ids": p}, params)
        steps, done, t0 = 0, {}, time.perf_counter()
        while engine.has_unfinished_requests():
            steps += 1
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        seconds = time.perf_counter() - t0
        comm = engine.executor.collective_rpc("comm_stats")[0]  # rank 0's
        return {"tokens": [done[f"p{i}"] for i in range(len(prompts))], "steps": steps,
                "seconds": seconds, "comm": comm, "world_size": world, "threads": threads,
                "dtype": engine.executor.worker_info[0]["dtype"], "model": engine.model_name}
    finally:
        llm.shutdown()


# ---- the ring-attention kernel in CP processes ---------------------------------------------------

def _ring_rank(rank: int, cp: int, port: int, tokens: int, local_size: Optional[int], out) -> None:
    import torch
    import torch.distributed as dist

    from paraserve.distributed.parallel_state import GroupInfo
    from paraserve.distributed.ring import RingStats
    from paraserve.layers.ring_attention import (PAD_POSITION, attention_with_lse, ring_attention,
                                                 shard_positions, shard_sequence)

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=cp)
    try:
        gen = torch.Generator().manual_seed(0)
        H, KVH, D = 8, 2, 64
        q, k, v = (torch.randn(tokens, h, D, generator=gen) for h in (H, KVH, KVH))
        scale = 1 / math.sqrt(D)
        pos = shard_positions(tokens, cp, rank)
        group = GroupInfo("cp", cp, rank, dist.group.WORLD, tuple(range(cp)))
        stats = RingStats()
        for _ in range(2):  # the first call warms up; the second is measured
            stats = RingStats()
            got = ring_attention(shard_sequence(q, cp, rank), shard_sequence(k, cp, rank),
                                 shard_sequence(v, cp, rank), pos, pos, group, scale,
                                 local_size=local_size, stats=stats)
        real = pos != PAD_POSITION
        all_pos = torch.arange(tokens)
        mask = all_pos.unsqueeze(0) <= pos[real].unsqueeze(1)  # causal, [Tq, T]
        want, _ = attention_with_lse(q[pos[real]], k, v, scale, mask)
        err = (got[real].float() - want).abs().max().item()
        out.put((rank, {"max_abs_err": err, "bytes_sent": stats.bytes_sent, "transfers": stats.transfers,
                        "hidden_fraction": stats.hidden_fraction, "compute_s": stats.compute_s,
                        "wait_s": stats.wait_s}))
    finally:
        dist.destroy_process_group()


def _ring_run(cp: int, tokens: int, local_size: Optional[int]) -> dict[str, Any]:
    import multiprocessing

    import torch.distributed as dist

    from paraserve.engine.executor import start_method

    ctx = multiprocessing.get_context(start_method())
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ring_rank, args=(r, cp, store.port, tokens, local_size, queue), daemon=True)
             for r in range(cp)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    per = [results[r] for r in range(cp)]
    return {"cp": cp, "local_size": local_size, "tokens": tokens, "per_rank": per,
            "max_abs_err": max(r["max_abs_err"] for r in per),
            "bytes_sent_per_rank": per[0]["bytes_sent"],
            "hidden_fraction": sum(r["hidden_fraction"] for r in per) / cp}


# ---- the command ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> Report:
    import random

    from paraserve.bench import common
    from paraserve.bench.report import machine_info
    from paraserve.models.loader import load_hf_config, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    hf_config = load_hf_config(source)
    layouts = args.layouts.split(",") if args.layouts else default_layouts(hf_config)
    token_ids = common.prompt_token_ids(load_tokenizer(source), hf_config.vocab_size)
    rng = random.Random(args.seed)
    prompts = [[rng.choice(token_ids) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    base = _run_engine(args, prompts)
    rows: list[list[Any]] = [_row("1 process", base, base)]
    results: dict[str, Any] = {"one_process": _plain(base), "layouts": {}, "ring": []}
    ok = True
    for name in layouts:
        r = _run_engine(args, prompts, **parse_layout(name))
        r["identical"] = r["tokens"] == base["tokens"]
        ok &= r["identical"]
        rows.append(_row(name, r, base))
        results["layouts"][name] = _plain(r)
    if args.ring_tokens:
        for cp, local in ((2, None), (4, None), (4, 2)):
            ring = _ring_run(cp, args.ring_tokens, local)
            ring["ok"] = ring["max_abs_err"] < 1e-4
            ok &= ring["ok"]
            results["ring"].append(ring)
            label = f"ring cp{cp} " + ("(flat)" if local is None else f"({cp // local} nodes x {local})")
            rows.append([label, cp, "yes" if ring["ok"] else "NO", f"err {ring['max_abs_err']:.1e}",
                         None, None, None, None, None, None, ring["bytes_sent_per_rank"] / 1024,
                         f"{ring['hidden_fraction']:.0%}"])
    notes = [f"workload: {args.num_prompts} prompts of {args.input_len} random token ids, "
             f"{args.output_len} greedy tokens each, seed {args.seed}; every layout must give the "
             "one-process engine's tokens (that engine is the baseline here; transformers is not run)",
             "KiB/step: what rank 0 sends per engine step, per collective (ring all-reduce 2(n-1)/n x "
             "the tensor, all-gather (n-1) x its part, all-to-all the rows for other ranks, broadcast "
             "(n-1) x the tensor); time per step on shared cores is noise, compare within this run",
             "cp layouts: prefill chunks run by zigzag ring attention in the engine; ring KiB per "
             "ring call (one layer of one prompt) from rank 0; hidden: share of the ring transfers' "
             "in-flight time overlapped by block compute (exact on CPU/gloo)",
             f"ring rows: the ring-attention kernel alone over cp gloo processes on {args.ring_tokens} "
             "random tokens (8 heads, 2 KV heads, dim 64, causal, zigzag), error vs plain attention"]
    return Report("parallel", machine_info(base["dtype"], base["model"]), common.config_of(args), _HEADERS,
                  rows, results, notes, ok)


_HEADERS = ["layout", "ranks", "identical", "steps", "ms/step", "vs 1 process",
            "all_reduce KiB/step", "all_gather KiB/step", "all_to_all KiB/step", "broadcast KiB/step",
            "ring KiB/call", "ring hidden"]


def _row(name: str, r: dict, base: dict) -> list[Any]:
    per_step = {k: sum(r["comm"]["bytes_sent"].get(n, 0) for n in names) / r["steps"] / 1024
                for k, names in _COLLECTIVES.items()}
    ring = r["comm"]["ring"]
    ms = r["seconds"] / r["steps"] * 1000
    base_ms = base["seconds"] / base["steps"] * 1000
    same = "yes" if r["tokens"] == base["tokens"] else "NO"
    return [name, r["world_size"], same, r["steps"], ms, f"{ms / base_ms:.2f}x",
            per_step["all_reduce"], per_step["all_gather"], per_step["all_to_all"], per_step["broadcast"],
            ring["bytes_sent"] / max(ring["calls"], 1) / 1024 if ring["calls"] else None,
            f"{ring['hidden_fraction']:.0%}" if ring["hidden_fraction"] is not None else None]


def _plain(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"} | {"num_tokens": sum(map(len, r["tokens"]))}
