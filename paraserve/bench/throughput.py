"""`paraserve bench throughput`: offline LLM.generate over a whole workload, vs transformers
static batches on the same requests."""
from __future__ import annotations

import argparse
import time
from typing import Any, Optional

from paraserve.bench.report import COMPARISON_HEADERS, Report, comparison_row


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=32, help="requests in the workload (default: 32)")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    g.add_argument("--output-len", type=int, default=64, help="output tokens per request (default: 64)")
    add_mixed_arg(g)
    g.add_argument("--hf-batch-size", type=int, default=16,
                   help="static batch size of the transformers baseline (default: 16)")


def add_mixed_arg(g: Any) -> None:
    g.add_argument("--mixed", action="store_true",
                   help="random lengths instead: prompts uniform in [16, 512] tokens, outputs uniform in "
                        "[16, 256] tokens, from --seed (--input-len/--output-len are ignored)")


def workload_note(args: argparse.Namespace, desc: dict) -> str:
    kind = ("mixed: prompt lengths U[16,512], output lengths U[16,256]" if args.mixed
            else f"fixed: {args.input_len} prompt tokens, {args.output_len} output tokens")
    return (f"workload: {desc['num_requests']} requests of random token ids, {kind}, seed {args.seed}; "
            f"{desc['prompt_tokens']} prompt + {desc['output_tokens']} output tokens; greedy, ignore_eos")


def run(args: argparse.Namespace) -> Report:
    from paraserve.bench import common
    from paraserve.bench.report import machine_info
    from paraserve.bench.workload import build_workload, check_fits, describe
    from paraserve.sampling_params import SamplingParams

    llm = common.make_llm(args)
    token_ids = common.engine_token_ids(llm)
    workload = build_workload(args.mixed, args.num_prompts, args.input_len, args.output_len, token_ids,
                              args.seed)
    check_fits(workload, llm.engine.max_model_len)
    common.warmup_engine(llm, token_ids)
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": list(r.prompt_ids)} for r in workload], params)
    elapsed = time.perf_counter() - t0
    desc = describe(workload)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    ours = _rates(elapsed, len(workload), desc["prompt_tokens"], generated)
    dtype, device, source = llm.engine.worker.dtype, llm.engine.worker.device, llm.engine.source
    machine = machine_info(common.dtype_name(dtype), llm.engine.model_name)
    del llm, outs
    common.free_memory()

    theirs = None
    if args.baseline:
        from paraserve.bench import hf_baseline

        model = hf_baseline.load_hf_model(source, dtype, device)
        hf_baseline.warmup(model, token_ids[0])
        hf = hf_baseline.run_static_batches(model, workload, args.hf_batch_size)
        theirs = {**_rates(hf.elapsed_s, len(workload), hf.prompt_tokens, hf.output_tokens),
                  "generated_tokens": hf.generated_tokens, "batch_size": args.hf_batch_size}
    notes = [workload_note(args, desc)]
    if theirs:
        notes.append(f"baseline: transformers generate, static batches of {args.hf_batch_size} in arrival "
                     "order, left padding, greedy; only each request's own output tokens count")
    results = {"workload": desc, "paraserve": ours, "transformers": theirs, "ratio": _ratios(ours, theirs)}
    return Report("throughput", machine, common.config_of(args), COMPARISON_HEADERS, _rows(ours, theirs),
                  results, notes)


def _rates(elapsed: float, requests: int, prompt_tokens: int, output_tokens: int) -> dict[str, float]:
    return {"elapsed_s": elapsed, "requests": requests, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "requests_per_s": requests / elapsed,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed}


_METRICS = [("elapsed (s)", "elapsed_s", False), ("requests/s", "requests_per_s", True),
            ("output tokens/s", "output_tokens_per_s", True), ("total tokens/s", "total_tokens_per_s", True)]


def _rows(ours: dict, theirs: Optional[dict]) -> list[list]:
    return [comparison_row(label, ours[key], theirs[key] if theirs else None, up)
            for label, key, up in _METRICS]


def _ratios(ours: dict, theirs: Optional[dict]) -> Optional[dict[str, float]]:
    if not theirs:
        return None
    return {key: ours[key] / theirs[key] for _, key, _ in _METRICS}
