"""`paraserve bench`: the benchmark suite. Each sub-command prints one table and writes JSON, and
runs the Hugging Face transformers baseline on the same workload in the same run (absolute times
on shared machines are noise; ratios within one run are what count). See benchmarks/README.md.

Sub-command modules import torch only inside `run`, so `paraserve --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "throughput": ("paraserve.bench.throughput",
                   "offline LLM.generate throughput vs transformers static batches"),
    "latency": ("paraserve.bench.latency", "batch-1 time to first token and decode tokens/s"),
    "serve": ("paraserve.bench.serve",
              "concurrent streaming clients against `paraserve serve`: TTFT, TPOT, tokens/s"),
    "prefix": ("paraserve.bench.prefix",
               "time to first token with and without prefix caching on a shared system prompt"),
    "parallel": ("paraserve.bench.parallel",
                 "each parallel layout (tp, ep, cp, ...) vs the one-process engine: identical tokens, "
                 "bytes per collective per step; ring attention: error and communication hidden"),
    "spec": ("paraserve.bench.spec",
             "speculative decoding (ngram, redrafter) vs plain decoding of the same engine: decode "
             "speedup, accepted length, greedy outputs identical"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from paraserve.bench.common import add_common_args

    bench = subparsers.add_parser("bench", help="benchmarks, each against transformers in the same run")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_args(p)
        add_common_args(p, name)


def main(args: argparse.Namespace) -> int:
    from paraserve.bench.report import emit

    report = importlib.import_module(COMMANDS[args.bench_command][0]).run(args)
    emit(report, args.output_json)
    return 0 if report.ok else 1
