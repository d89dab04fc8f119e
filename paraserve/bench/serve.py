"""`paraserve bench serve`: streaming clients against a real `paraserve serve` process over the
OpenAI HTTP API, at one or several concurrency levels, vs transformers static batches of the
same size on the same workload."""
from __future__ import annotations

import argparse
from typing import Any, Optional

from paraserve.bench.report import Report, ratio, verdict


def add_args(p: argparse.ArgumentParser) -> None:
    from paraserve.bench.throughput import add_mixed_arg

    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=32, help="requests per concurrency level (default: 32)")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    g.add_argument("--output-len", type=int, default=64, help="output tokens per request (default: 64)")
    add_mixed_arg(g)
    g.add_argument("--num-clients", type=int, default=8,
                   help="concurrent streaming clients, each sending its next request when the last ends "
                        "(default: 8)")
    g.add_argument("--concurrency-sweep", type=parse_levels, default=None, metavar="C1,C2,...",
                   help="run several concurrency levels instead of --num-clients, e.g. 1,4,16,64")
    g.add_argument("--url", default=None,
                   help="benchmark a server already running there instead of starting one; --model and "
                        "--dtype must name the server's (prompts and the baseline use them; auto: float32)")
    g.add_argument("--api-key", default=None, help="bearer key for --url (default: none)")
    g.add_argument("--plot", default=None, metavar="PNG",
                   help="draw output tokens/s vs concurrency, paraserve and transformers (needs matplotlib)")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return levels


def _measure_server(args: argparse.Namespace, url: str, workload: list, levels: list[int],
                    token_id: int) -> tuple[str, dict[int, dict], dict]:
    from paraserve.bench import load_client
    from paraserve.bench.workload import BenchRequest, check_fits

    model, max_model_len = load_client.served_model(url, args.api_key)
    if max_model_len:
        check_fits(workload, max_model_len)
    load_client.run_load(url, model, [BenchRequest((token_id,) * 16, 4)] * 2, 2, "warm-up", args.api_key)
    out, raw = {}, {}
    for c in levels:
        results, elapsed = load_client.run_load(url, model, workload, c, f"paraserve c={c}", args.api_key)
        out[c] = load_client.summarize(results, elapsed)
        raw[c] = [vars(r) for r in results]
    return model, out, raw


def _measure_hf(args: argparse.Namespace, source: Any, dtype_name: str, workload: list, levels: list[int],
                token_id: int) -> dict[int, dict]:
    import torch

    from paraserve.bench import hf_baseline
    from paraserve.bench.report import stats
    from paraserve.worker.worker import resolve_device

    model = hf_baseline.load_hf_model(source, getattr(torch, dtype_name), resolve_device(args.device))
    hf_baseline.warmup(model, token_id)
    out = {}
    for c in levels:
        hf = hf_baseline.run_static_batches(model, workload, c, f"transformers batch={c}")
        out[c] = {**hf.as_dict(), "ttft_s": stats(hf.ttft_s), "e2e_s": stats(hf.e2e_s)}
    return out


def run(args: argparse.Namespace) -> Report:
    from paraserve.bench import common
    from paraserve.bench.report import machine_info
    from paraserve.bench.server_process import ServerProcess, serve_flags, wait_healthy
    from paraserve.bench.workload import build_workload, describe
    from paraserve.models.loader import load_hf_config, load_tokenizer, resolve_model

    levels = args.concurrency_sweep or [args.num_clients]
    common.set_threads(args)  # the baseline runs here; the server sets the same from --threads
    source = resolve_model(args.model)
    token_ids = common.prompt_token_ids(load_tokenizer(source), load_hf_config(source).vocab_size)
    workload = build_workload(args.mixed, args.num_prompts, args.input_len, args.output_len, token_ids,
                              args.seed)
    dtype: Optional[str] = None
    if args.url:
        url = args.url.rstrip("/")
        wait_healthy(url)
        name, ours, raw = _measure_server(args, url, workload, levels, token_ids[0])
    else:
        with ServerProcess(serve_flags(args)) as server:
            name, ours, raw = _measure_server(args, server.url, workload, levels, token_ids[0])
            dtype = server.dtype
    # the server is gone before the baseline starts, so the two never compete for cores
    dtype = dtype or (args.dtype if args.dtype != "auto" else "float32")
    theirs = _measure_hf(args, source, dtype, workload, levels, token_ids[0]) if args.baseline else None
    if args.plot:
        from paraserve.bench.plot import plot_sweep

        plot_sweep(args.plot, levels, [ours[c]["output_tokens_per_s"] for c in levels],
                   [theirs[c]["output_tokens_per_s"] for c in levels] if theirs else None)
    from paraserve.bench.throughput import workload_note

    notes = [workload_note(args, describe(workload)),
             f"paraserve: `paraserve serve` at {args.url or '127.0.0.1 (child process)'}, streaming "
             "/v1/completions; c closed-loop clients (each sends its next request when its last ends)",
             "transformers: generate in static batches of c (the same c requests in flight); its TTFT is "
             "a batch's time to first token, its TPOT is not measured"]
    results = {"levels": levels, "paraserve": {str(c): ours[c] for c in levels},
               "transformers": {str(c): theirs[c] for c in levels} if theirs else None,
               "ratio_output_tokens_per_s": {str(c): ratio(ours[c]["output_tokens_per_s"],
                                                           theirs[c]["output_tokens_per_s"]) for c in levels}
               if theirs else None, "requests": {str(c): raw[c] for c in levels}}
    return Report("serve", machine_info(dtype, name), common.config_of(args),
                  ["metric"] + [f"c={c}" for c in levels], _rows(levels, ours, theirs), results, notes)


def _rows(levels: list[int], ours: dict[int, dict], theirs: Optional[dict[int, dict]]) -> list[list]:
    def row(label: str, get: Any) -> list:
        return [label] + [get(c) for c in levels]

    def ms(d: Optional[dict], key: str) -> Optional[float]:
        return None if d is None else d[key] * 1000

    rows = [row("output tokens/s, paraserve", lambda c: ours[c]["output_tokens_per_s"])]
    if theirs:
        rows += [row("output tokens/s, transformers", lambda c: theirs[c]["output_tokens_per_s"]),
                 row("paraserve/transformers (tokens/s)",
                     lambda c: ratio(ours[c]["output_tokens_per_s"], theirs[c]["output_tokens_per_s"])),
                 row("paraserve is", lambda c: verdict(ratio(ours[c]["output_tokens_per_s"],
                                                             theirs[c]["output_tokens_per_s"]), True))]
    rows.append(row("requests/s, paraserve", lambda c: ours[c]["requests_per_s"]))
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E latency")):
        for stat in ("mean", "p50", "p99"):
            rows.append(row(f"{label} {stat} (ms), paraserve", lambda c: ms(ours[c][key], stat)))
    if theirs:
        rows.append(row("TTFT p99 (ms), transformers", lambda c: ms(theirs[c]["ttft_s"], "p99")))
    if any(ours[c]["errors"] for c in levels):
        rows.append(row("failed requests", lambda c: ours[c]["errors"]))
    return rows
