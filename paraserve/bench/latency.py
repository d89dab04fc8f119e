"""`paraserve bench latency`: one request at a time. Time to first token of an --input-len prompt
and decode tokens/s over --output-len tokens, through the engine's step API, vs transformers."""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from paraserve.bench.report import COMPARISON_HEADERS, Report, comparison_row

if TYPE_CHECKING:
    from paraserve.engine.llm_engine import LLMEngine
    from paraserve.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    g.add_argument("--output-len", type=int, default=64, help="tokens to decode (default: 64)")
    g.add_argument("--num-iters", type=int, default=3,
                   help="timed requests, each with its own prompt, after one warm-up (default: 3)")
    g.add_argument("--baseline-compile", action="store_true",
                   help="run transformers with a static cache and torch.compile (inductor); its "
                        "compile time is reported and kept out of the timings")


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    e2e_s: float
    output_tokens: int

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        # the first token belongs to prefill; decode is what follows it
        if self.output_tokens < 2 or self.e2e_s <= self.ttft_s:
            return None
        return (self.output_tokens - 1) / (self.e2e_s - self.ttft_s)


def time_request(engine: "LLMEngine", prompt_ids: Sequence[int], params: "SamplingParams") -> RequestTiming:
    """Add one request to an idle engine and step it to the end, noting the first token."""
    t0 = time.perf_counter()
    rid = engine.add_request(None, {"prompt_token_ids": list(prompt_ids)}, params)
    ttft: Optional[float] = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            n = len(out.outputs[0].token_ids)
            if ttft is None and n:
                ttft = time.perf_counter() - t0
            if out.finished:
                return RequestTiming(ttft if ttft is not None else time.perf_counter() - t0,
                                     time.perf_counter() - t0, n)
    raise RuntimeError(f"request {rid} left the engine without finishing")


def summarize(timings: Sequence[RequestTiming]) -> dict:
    ttft = [t.ttft_s for t in timings]
    rates = [r for r in (t.decode_tokens_per_s for t in timings) if r is not None]
    return {"ttft_s_mean": statistics.fmean(ttft), "ttft_s_median": statistics.median(ttft),
            "decode_tokens_per_s_mean": statistics.fmean(rates) if rates else None,
            "decode_tokens_per_s_median": statistics.median(rates) if rates else None,
            "iterations": [{"ttft_s": t.ttft_s, "e2e_s": t.e2e_s, "output_tokens": t.output_tokens,
                            "decode_tokens_per_s": t.decode_tokens_per_s} for t in timings]}


def run(args: argparse.Namespace) -> Report:
    from tqdm import tqdm

    from paraserve.bench import common
    from paraserve.bench.report import machine_info
    from paraserve.bench.workload import check_fits, fixed_workload
    from paraserve.sampling_params import SamplingParams

    if args.num_iters < 1:
        raise ValueError(f"--num-iters must be >= 1, got {args.num_iters}")
    llm = common.make_llm(args)
    token_ids = common.engine_token_ids(llm)
    # one distinct prompt per iteration (plus the warm-up), so no prefix-cache hits help
    warm, *workload = fixed_workload(args.num_iters + 1, args.input_len, args.output_len, token_ids,
                                     args.seed)
    check_fits(workload, llm.engine.max_model_len)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    time_request(llm.engine, warm.prompt_ids, params)
    ours = summarize([time_request(llm.engine, r.prompt_ids, params)
                      for r in tqdm(workload, desc="paraserve", unit="req", dynamic_ncols=True)])
    dtype, device, source = llm.engine.worker.dtype, llm.engine.worker.device, llm.engine.source
    machine = machine_info(common.dtype_name(dtype), llm.engine.model_name)
    del llm
    common.free_memory()

    theirs = None
    if args.baseline:
        from paraserve.bench import hf_baseline

        model = hf_baseline.load_hf_model(source, dtype, device)
        if args.baseline_compile:
            hf_baseline.compile_for_decode(model)
        t0 = time.perf_counter()
        hf_baseline.generate_batch(model, [warm])
        warmup_s = time.perf_counter() - t0
        timings = []
        for r in tqdm(workload, desc="transformers", unit="req", dynamic_ncols=True):
            ttft, total = hf_baseline.generate_batch(model, [r])
            timings.append(RequestTiming(ttft, total, r.output_len))
        theirs = summarize(timings)
        theirs["compiled"], theirs["warmup_s"] = args.baseline_compile, warmup_s
    notes = [f"workload: batch 1, {args.num_iters} requests of {args.input_len} random prompt tokens "
             f"-> {args.output_len} greedy tokens (ignore_eos), one warm-up request first, seed {args.seed}",
             "TTFT: request added until its first token (paraserve: engine.step(); transformers: "
             "generate(), KV cache on); decode tokens/s: the tokens after the first"]
    if theirs and args.baseline_compile:
        notes.append(f"transformers: static cache + torch.compile; its warm-up request (compiling) "
                     f"took {theirs['warmup_s']:.1f} s")
    rows = [comparison_row(label, ours[key], theirs[key] if theirs else None, up)
            for label, key, up in _METRICS]
    for row in rows:
        if row[0].startswith("TTFT"):  # milliseconds read better than seconds here
            row[1:3] = [None if v is None else v * 1000 for v in row[1:3]]
    ratios = ({key: ours[key] / theirs[key] for _, key, _ in _METRICS if ours[key] and theirs[key]}
              if theirs else None)
    return Report("latency", machine, common.config_of(args), COMPARISON_HEADERS, rows,
                  {"paraserve": ours, "transformers": theirs, "ratio": ratios}, notes)


_METRICS = [("TTFT mean (ms)", "ttft_s_mean", False), ("TTFT median (ms)", "ttft_s_median", False),
            ("decode tokens/s mean", "decode_tokens_per_s_mean", True),
            ("decode tokens/s median", "decode_tokens_per_s_median", True)]
