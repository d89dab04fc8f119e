"""`paraserve bench spec`: speculative decoding against plain decoding of the same engine.

One engine per method, built with speculation; the plain baseline is the same engine with every
request opted out (SamplingParams(speculative=False)), so weights, KV cache and kernels are
identical and only the drafting differs. Per prompt set and batch size, plain and speculative
runs alternate on the same prompts, greedy, up to --output-len tokens (EOS may end them sooner:
the actual counts are reported). Greedy speculation is lossless, so both must produce the same
tokens; any difference is reported loudly and makes the command exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import operator
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from paraserve.bench.report import Cell, Report

if TYPE_CHECKING:
    from paraserve.bench.step_timer import StepTimer
    from paraserve.engine.llm_engine import LLMEngine
    from paraserve.llm import LLM
    from paraserve.sampling_params import SamplingParams

DEFAULT_METHODS = ("ngram", "redrafter")


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--methods", type=_names, default=None, metavar="M1,M2",
                   help="speculative methods to measure, one engine each (default: the method named in "
                        "--speculative-config, else ngram,redrafter)")
    g.add_argument("--batch-sizes", type=_sizes, default=[1, 8, 32], metavar="B1,B2,...",
                   help="concurrent requests per run; batch 1 runs --num-prompts requests one at a time "
                        "(default: 1,8,32)")
    g.add_argument("--prompt-sets", type=_names, default=["chat", "code"], metavar="S1,S2",
                   help="shipped prompt sets: chat, code, long (questions about 2k- and 4k-token contexts) "
                        "(default: chat,code)")
    g.add_argument("--output-len", type=int, default=128,
                   help="max_tokens of every request; greedy, EOS may end it sooner (default: 128)")
    g.add_argument("--num-prompts", type=int, default=8,
                   help="requests timed one at a time at batch 1, per prompt set (default: 8)")
    g.add_argument("--num-iters", type=int, default=1,
                   help="rounds of the alternating plain and speculative runs per prompt set and batch "
                        "size; the figures pool every round and the speedup cell adds the rounds' range, "
                        "as on a shared machine one round's speedup can move by 10%% (default: 1)")
    g.add_argument("--step-breakdown", action="store_true",
                   help="also time each decode step's phases (preparation, forward, LM head, sampling, "
                        "verification, drafting) and add to the table the milliseconds per step and the "
                        "speedup were drafting free; the phases are in the JSON (in-process engines only)")
    g.add_argument("--drafter", default=None, metavar="PATH",
                   help="ReDrafter directory from `paraserve train-drafter` (default: the one shipped for "
                        "the model; without one, redrafter is skipped with a note)")


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return sizes


# ---- the engines' speculative configs --------------------------------------------------------

def spec_configs(methods: Optional[Sequence[str]], overrides_json: Optional[str],
                 drafter: Optional[str]) -> dict[str, dict[str, Any]]:
    """method -> the speculative_config its engine gets. --speculative-config's keys override the
    defaults of every method they belong to (disable_by_batch_size, num_speculative_tokens,
    prompt_lookup_*: all, redrafter's lookup beam uses the latter; beam_*, lookup_*:
    redrafter); its "method" only picks the default --methods."""
    # _SPEC_ONLY says which keys belong to one method only; SpecConfig rejects the other's keys
    from paraserve.config import _SPEC_ONLY, SPEC_METHODS, ConfigError, SpecConfig, parse_json_object

    overrides: dict[str, Any] = parse_json_object(overrides_json or "", "--speculative-config",
                                                  '{"disable_by_batch_size": 64}') or {}
    named = overrides.pop("method", None)
    methods = list(methods or ([named] if named else DEFAULT_METHODS))
    unknown = [m for m in methods if m not in SPEC_METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: give distinct methods from {', '.join(SPEC_METHODS)}, "
                          f"got {methods}")
    out, used = {}, set()
    for m in methods:
        others = {k for om, keys in _SPEC_ONLY.items() if om != m for k in keys}
        cfg = {"method": m, **{k: v for k, v in overrides.items() if k not in others}}
        used |= cfg.keys()
        if m == "redrafter" and drafter is not None:
            cfg["drafter_path"] = drafter
        SpecConfig.parse(dict(cfg))  # a bad key or value fails now, before any model loads
        out[m] = cfg
    unused = sorted(set(overrides) - used)
    if unused:  # silently measuring without them would answer another question
        raise ConfigError(f"--speculative-config: {', '.join(unused)} is not an option of "
                          f"{', '.join(methods)}")
    return out


def missing_drafter(cfg: dict[str, Any], model_name: str) -> Optional[str]:
    """Why a redrafter engine cannot be built (no drafter), or None."""
    import os

    from paraserve.spec_decode.redrafter import shipped_drafter_path

    path = cfg.get("drafter_path")
    if path is not None:
        return None if os.path.isdir(path) else f"drafter {path} is not a directory"
    try:
        shipped_drafter_path(model_name)
    except ValueError as e:
        return str(e)
    return None


# ---- one run: requests added together, stepped to the end ------------------------------------

@dataclass
class Run:
    """Decode is timed from the step after which every request has its first token (prefill and
    TTFT excluded, as in `bench latency`) to the last token; at batch 1 this is latency's rate."""
    decode_s: float
    decode_tokens: int  # tokens emitted after that step
    elapsed_s: float
    outputs: list[list[int]]  # per request, in order
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # --step-breakdown: seconds per phase over the decode steps timed (step_timer.py)
    phase_s: dict[str, float] = dataclasses.field(default_factory=dict)
    timed_steps: int = 0

    def __add__(self, other: "Run") -> "Run":
        phases = {k: self.phase_s.get(k, 0.0) + other.phase_s.get(k, 0.0)
                  for k in self.phase_s.keys() | other.phase_s.keys()}
        return Run(self.decode_s + other.decode_s, self.decode_tokens + other.decode_tokens,
                   self.elapsed_s + other.elapsed_s, self.outputs + other.outputs,
                   self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                   self.num_accepted_tokens + other.num_accepted_tokens, phases,
                   self.timed_steps + other.timed_steps)


def run_requests(engine: "LLMEngine", prompts: Sequence[list[int]], params: "SamplingParams",
                 timer: Optional["StepTimer"] = None) -> Run:
    """timer: add up where the decode steps' time goes (the steps from the one after which every
    request has its first token, as the decode rate)."""
    before = engine.spec_decoding_stats()
    if timer is not None:
        timer.totals.clear()
        timer.steps = 0
    t0 = time.perf_counter()
    ids = [engine.add_request(None, {"prompt_token_ids": list(p)}, dataclasses.replace(params))
           for p in prompts]
    counts = dict.fromkeys(ids, 0)
    done: dict[str, list[int]] = {}
    t_first: Optional[float] = None
    base = 0
    while engine.has_unfinished_requests():
        for out in (engine.step() if timer is None else timer.step(keep=t_first is not None)):
            if out.request_id in counts:
                counts[out.request_id] = len(out.outputs[0].token_ids)
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
        if t_first is None and all(counts.values()):
            t_first, base = time.perf_counter(), sum(counts.values())
    t_end = time.perf_counter()
    if len(done) != len(ids):
        raise RuntimeError(f"{len(ids) - len(done)} requests left the engine without finishing")
    after = engine.spec_decoding_stats()
    return Run(t_end - (t_first or t_end), sum(counts.values()) - base, t_end - t0, [done[i] for i in ids],
               after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
               after.num_accepted_tokens - before.num_accepted_tokens,
               dict(timer.totals) if timer is not None else {}, timer.steps if timer is not None else 0)


def measure(engine: "LLMEngine", prompts: Sequence[list[int]], batch_size: int, output_len: int,
            bar: Any, timer: Optional["StepTimer"] = None) -> tuple[Run, Run]:
    """Plain and speculative runs of the prompts in groups of batch_size, alternating so that
    both see the same machine load."""
    from paraserve.sampling_params import SamplingParams

    plain_params = SamplingParams(temperature=0, max_tokens=output_len, speculative=False)
    spec_params = SamplingParams(temperature=0, max_tokens=output_len)
    plain, spec = [], []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        plain.append(run_requests(engine, group, plain_params, timer))
        bar.update(len(group))
        spec.append(run_requests(engine, group, spec_params, timer))
        bar.update(len(group))
    return functools.reduce(operator.add, plain), functools.reduce(operator.add, spec)


# ---- figures and the table --------------------------------------------------------------------

def mismatches(plain: Sequence[list[int]], spec: Sequence[list[int]]) -> list[dict[str, int]]:
    """Requests whose speculative greedy output differs from the plain one."""
    out = []
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a != b:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append({"request": i, "first_difference": first, "plain_tokens": len(a),
                        "spec_tokens": len(b)})
    return out


def speculation_label(batch_size: int, limit: int, num_drafts: int) -> str:
    """What the engine's disable_by_batch_size made of this batch size. Above it, speculation can
    still start once enough requests have finished (EOS) that few enough are left: 'tail'."""
    if batch_size <= limit:
        return "on"
    return f"off (>{limit})" + (", tail on" if num_drafts else "")


def _rate(r: Run) -> Optional[float]:
    return r.decode_tokens / r.decode_s if r.decode_s > 0 and r.decode_tokens else None


def _speedup(plain: Run, spec: Run) -> Optional[float]:
    ours, base = _rate(spec), _rate(plain)
    return ours / base if ours and base else None


def pooled_figures(rounds: Sequence[tuple[Run, Run]], batch_size: int, limit: int) -> dict[str, Any]:
    """figures() over every round's (plain, spec) runs pooled (requests and tokens of all
    rounds), plus each round's own speedup and their median."""
    plain, spec = (functools.reduce(operator.add, side) for side in zip(*rounds))
    out = figures(plain, spec, batch_size, limit)
    per = [_speedup(p, s) for p, s in rounds]
    out["rounds"] = len(rounds)
    out["speedup_per_iter"] = per
    known = [x for x in per if x is not None]
    out["speedup_median"] = statistics.median(known) if known else None
    if "step_ms" in out:  # each round's too: its figures move with the machine's state
        out["step_ms_per_iter"] = [step_breakdown(p, s) for p, s in rounds]
    return out


def figures(plain: Run, spec: Run, batch_size: int, limit: int) -> dict[str, Any]:
    def side(r: Run) -> dict[str, Any]:
        return {"decode_tokens_per_s": _rate(r), "decode_tokens": r.decode_tokens, "decode_s": r.decode_s,
                "elapsed_s": r.elapsed_s, "output_tokens": sum(len(o) for o in r.outputs),
                "output_tokens_per_request": [len(o) for o in r.outputs]}

    drafts = spec.num_drafts
    return {"batch_size": batch_size, "requests": len(plain.outputs),
            "speculation": speculation_label(batch_size, limit, drafts), "disable_by_batch_size": limit,
            "plain": side(plain), "spec": side(spec),
            "speedup": _speedup(plain, spec),
            "num_drafts": drafts, "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            # the engine's definitions (SpecDecodingStats): tokens per verification incl. the bonus
            # token; accepted / drafted tree nodes
            "mean_accepted_length": (spec.num_accepted_tokens + drafts) / drafts if drafts else None,
            "acceptance_rate": (spec.num_accepted_tokens / spec.num_draft_tokens
                                if spec.num_draft_tokens else None),
            "mismatches": mismatches(plain.outputs, spec.outputs),
            **({"step_ms": breakdown} if (breakdown := step_breakdown(plain, spec)) else {})}


def step_breakdown(plain: Run, spec: Run) -> Optional[dict[str, Any]]:
    """--step-breakdown's figures: per side, milliseconds per decode step by phase (step_timer.py)
    and tokens per step; and the speedup the steps' times give, with and without drafting. The
    latter charges the speculative step neither its drafting nor more verification than plain
    decoding's sampling costs: what speculation would gain if proposing trees were free, an upper
    bound for any faster drafter of the same accuracy."""
    from paraserve.bench.step_timer import per_step_ms

    p, s = per_step_ms(plain.phase_s, plain.timed_steps), per_step_ms(spec.phase_s, spec.timed_steps)
    if p is None or s is None or not plain.decode_tokens or not spec.decode_tokens:
        return None
    p["tokens_per_step"] = plain.decode_tokens / plain.timed_steps
    s["tokens_per_step"] = spec.decode_tokens / spec.timed_steps
    plain_rate = p["tokens_per_step"] / p["step"]
    free = s["step"] - s["drafting"] - s["verification"] - s["sampling"] + p["sampling"]
    return {"plain": p, "spec": s, "speedup": s["tokens_per_step"] / s["step"] / plain_rate,
            "speedup_without_drafting": s["tokens_per_step"] / free / plain_rate}


HEADERS = ["method", "prompts", "batch", "speculation", "plain tok/s", "spec tok/s", "speedup",
           "accepted len", "acceptance", "output tokens", "greedy identical"]
# with --step-breakdown: milliseconds per decode step, the speculative one's drafting, and the
# speedup the steps' times give were drafting free (step_breakdown)
BREAKDOWN_HEADERS = ["plain ms/step", "spec ms/step", "drafting ms", "without drafting"]


def table_row(run: dict[str, Any]) -> list[Cell]:
    bad = len(run["mismatches"])
    speedup = run["speedup"]
    cell = None if speedup is None else f"{speedup:.2f}x"
    per = [x for x in run.get("speedup_per_iter", []) if x is not None]
    if cell and len(per) > 1:  # pooled over rounds: their range too
        cell += f" ({min(per):.2f}-{max(per):.2f})"
    return [run["method"], run["prompts"], run["batch_size"], run["speculation"],
            run["plain"]["decode_tokens_per_s"], run["spec"]["decode_tokens_per_s"],
            cell, run["mean_accepted_length"],
            run["acceptance_rate"], run["plain"]["output_tokens"],
            "yes" if not bad else f"NO: {bad}/{run['requests']} differ", *breakdown_cells(run)]


def breakdown_cells(run: dict[str, Any]) -> list[Cell]:
    b = run.get("step_ms")
    if b is None:
        return []
    return [b["plain"]["step"], b["spec"]["step"], b["spec"]["drafting"], f"{b['speedup_without_drafting']:.2f}x"]


# ---- the command ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> Report:
    from tqdm import tqdm

    from paraserve.bench import common
    from paraserve.bench.prompt_sets import load_prompt_set
    from paraserve.bench.report import machine_info
    from paraserve.models.loader import resolve_model

    if args.output_len < 1 or args.num_prompts < 1 or args.num_iters < 1:
        raise ValueError("--output-len, --num-prompts and --num-iters must be >= 1")
    if args.step_breakdown and (args.distributed_executor_backend or args.tensor_parallel_size > 1
                                or args.context_parallel_size > 1):
        raise ValueError("--step-breakdown times the engine's worker in this process: one rank, "
                         "without --distributed-executor-backend")
    configs = spec_configs(args.methods, args.speculative_config, args.drafter)
    texts = {name: load_prompt_set(name) for name in args.prompt_sets}
    source_name = resolve_model(args.model).name  # what the engine finds a shipped drafter by
    why = missing_drafter(configs["redrafter"], source_name) if "redrafter" in configs else None
    skipped = {"redrafter": why} if why else {}
    for m, reason in skipped.items():
        print(f"note: skipping {m}: {reason}", file=sys.stderr, flush=True)
    todo = [m for m in configs if m not in skipped]

    runs: list[dict[str, Any]] = []
    used: dict[str, Any] = {}
    machine = machine_info(args.dtype, args.served_model_name or source_name)  # replaced once one loads
    per_method = sum(args.num_prompts if b == 1 else b for b in args.batch_sizes) * 2 * len(texts)
    per_method *= args.num_iters
    with tqdm(total=per_method * len(todo), desc="spec", unit="req", dynamic_ncols=True) as bar:
        for method in todo:
            # prefix caching off: the second run of a prompt would reuse the first's cached blocks and
            # compute only the prompt's tail, in other shapes; in bf16 that alone changes the numbers
            # and the identity check would compare two different computations, not speculation
            llm = common.make_llm(args, speculative_config=configs[method], enable_prefix_caching=False)
            used[method] = dataclasses.asdict(llm.engine.config.speculative)
            proposer = getattr(getattr(getattr(llm.engine.worker, "runner", None), "spec", None), "proposer", None)
            if hasattr(proposer, "int8"):  # the default None resolved (in-process workers only)
                used[method]["drafter_int8"] = proposer.int8
            machine = machine_info(common.dtype_name(llm.engine.worker.dtype), llm.engine.model_name)
            runs += _measure_method(llm, method, texts, args, bar)
            del llm
            common.free_memory()

    bad = [r for r in runs if r["mismatches"]]
    headers = HEADERS + (BREAKDOWN_HEADERS if args.step_breakdown else [])
    return Report("spec", machine, common.config_of(args), headers, [table_row(r) for r in runs],
                  {"runs": runs, "speculative_configs": used, "skipped": skipped,
                   "prompt_sets": {n: len(t) for n, t in texts.items()}, "greedy_identical": not bad},
                  _notes(args, used, skipped, runs), ok=not bad)


def _measure_method(llm: "LLM", method: str, texts: dict[str, list[str]], args: argparse.Namespace,
                    bar: Any) -> list[dict[str, Any]]:
    """Every prompt set x batch size on one engine built for `method`."""
    from paraserve.bench.prompt_sets import render, take
    from paraserve.bench.step_timer import StepTimer

    engine = llm.engine
    limit = engine.config.speculative.disable_by_batch_size
    rendered = {name: render(llm.tokenizer, t) for name, t in texts.items()}
    _warm_up(engine, next(iter(rendered.values())))
    timer = StepTimer(engine) if args.step_breakdown else None
    runs = []
    try:
        for name, prompts in rendered.items():
            for b in args.batch_sizes:
                bar.set_description(f"{method} {name} batch {b}")
                group = take(prompts, args.num_prompts if b == 1 else b)
                rounds = [measure(engine, group, b, args.output_len, bar, timer) for _ in range(args.num_iters)]
                runs.append({"method": method, "prompts": name, **pooled_figures(rounds, b, limit)})
                _shout(runs[-1])
    finally:
        if timer is not None:
            timer.remove()
    return runs


def _warm_up(engine: "LLMEngine", prompts: Sequence[list[int]]) -> None:
    """One-off costs (allocation, kernel selection, the drafter's first call) out of the timing:
    a short plain and a short speculative run."""
    from paraserve.sampling_params import SamplingParams

    for spec in (False, True):
        run_requests(engine, prompts[:2], SamplingParams(temperature=0, max_tokens=16, speculative=spec))


def _shout(run: dict[str, Any]) -> None:
    if run["mismatches"]:
        print(f"ERROR: {run['method']} on {run['prompts']} prompts at batch {run['batch_size']}: "
              f"{len(run['mismatches'])} greedy outputs differ from plain decoding (a correctness "
              f"bug): {run['mismatches']}", file=sys.stderr, flush=True)


def _notes(args: argparse.Namespace, used: dict[str, Any], skipped: dict[str, str],
           runs: list[dict[str, Any]]) -> list[str]:
    notes = [f"workload: prompt sets {', '.join(args.prompt_sets)} (shipped text, chat template), greedy, "
             f"max_tokens {args.output_len} (EOS may end a request sooner); batch 1: {args.num_prompts} "
             f"requests one at a time; batch B: the first B prompts together"
             + (f"; {args.num_iters} rounds, pooled (speedup: all rounds' tokens over all rounds' time, "
                f"then the range of the rounds' own speedups)" if args.num_iters > 1 else ""),
             "baseline: the same engine with every request opted out (speculative=False); plain and "
             "speculative runs alternate, prefix caching off (so both compute each prompt alike); decode "
             "tok/s excludes prefill (timed from the step after which every request has its first token); "
             "no transformers run",
             "accepted len: tokens per verification incl. the bonus token; acceptance: accepted / drafted "
             "tokens (every tree node counts as drafted)"]
    if args.step_breakdown:
        notes.append("step breakdown: wall ms per decode step, pooled over the rounds; drafting: the speculative "
                     "step's proposing of the next trees; without drafting: the speedup those steps' times give "
                     "were drafting free and verification as cheap as plain sampling (phases in the JSON)")
    for m, cfg in used.items():
        keys = ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None and k != "method")
        notes.append(f"{m}: {keys}")
    if any(r["speculation"].startswith("off") for r in runs):
        notes.append("speculation 'off (>N)': the engine's disable_by_batch_size turned it off at that batch "
                     "size; measure it anyway with --speculative-config '{\"disable_by_batch_size\": 64}'")
    notes += [f"skipped {m}: {why}" for m, why in skipped.items()]
    bad = [r for r in runs if r["mismatches"]]
    if bad:
        notes.append(f"ERROR: greedy outputs differ in {len(bad)} runs (details in the JSON): speculative "
                     "decoding is not lossless here; this is a correctness bug")
    return notes
