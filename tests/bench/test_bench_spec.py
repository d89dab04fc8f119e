"""`paraserve bench spec`: the shipped prompt sets, the speculative configs it builds, its figures
and table on hand-made runs, and one tiny end-to-end run through the CLI. Never asserts on speed."""
import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from paraserve.bench import prompt_sets as ps
from paraserve.bench import spec
from paraserve.config import ConfigError

# ---- prompt sets -------------------------------------------------------------------------------


def test_shipped_prompt_sets_load():
    chat, code = ps.load_prompt_set("chat"), ps.load_prompt_set("code")
    assert len(chat) == len(code) == 32  # enough for the default largest batch, 32
    assert len(set(chat)) == len(chat) and len(set(code)) == len(code)
    assert all("\n" not in p and p.endswith(("?", ".")) for p in chat)
    assert all("```" in p and p.count("```") % 2 == 0 for p in code)  # an instruction + a code block
    assert any("    " in p for p in code)  # indentation survives the block format
    with pytest.raises(ValueError, match="chat, code"):
        ps.load_prompt_set("poems")


def test_long_prompts_ask_about_long_shipped_contexts():
    from paraserve.models.loader import load_tokenizer, resolve_model

    long = ps.load_prompt_set("long")
    assert len(long) == len(ps.LONG_TASKS) == 8 and len(set(long)) == 8
    code, questions = long[0].rsplit("\n\n", 1)[0], long[-1].rsplit("\n\n", 1)[0]
    assert code.startswith("```python\ndef count_words") and code.count("def ") >= 20
    assert questions.startswith("Questions people asked:\n") and questions.count("\n") > 300
    tok = load_tokenizer(resolve_model(None))  # the default model's
    lengths = [len(ids) for ids in ps.render(tok, long)]
    assert min(lengths) > 2000 and max(lengths) < 5000, lengths


def test_chat_prompts_are_held_out_from_the_drafter_training_prompts():
    from paraserve.spec_decode.train_drafter import PROMPTS_FILE

    with open(PROMPTS_FILE) as f:
        trained = {line.strip().lower() for line in f}
    assert not {p.lower() for p in ps.load_prompt_set("chat")} & trained


def test_parse_prompts_formats():
    assert ps.parse_prompts("a?\n\n  b.  \n", "lines") == ["a?", "b."]
    text = "do x:\n\n```\n  y = 1\n```\n%%\n\nsecond\n  %%  \n%%\n"
    assert ps.parse_prompts(text, "blocks") == ["do x:\n\n```\n  y = 1\n```", "second"]
    with pytest.raises(ValueError):
        ps.parse_prompts("x", "csv")
    assert ps.take([1, 2, 3], 2) == [1, 2] and ps.take([1, 2], 5) == [1, 2, 1, 2, 1]


def test_render_uses_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    [ids] = ps.render(tok, ["Why is the sky blue?"])
    assert tok.decode(ids) == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    assert ps.render(tok, ["hi there"]) == [tok.encode("hi there")]


# ---- speculative configs -----------------------------------------------------------------------

def test_spec_configs_defaults_and_overrides():
    assert spec.spec_configs(None, None, None) == {"ngram": {"method": "ngram"},
                                                   "redrafter": {"method": "redrafter"}}
    # shared keys go to every method, a method's own keys only to it; "method" picks the default
    both = spec.spec_configs(["ngram", "redrafter"], '{"disable_by_batch_size": 64, "beam_width": 2, '
                             '"prompt_lookup_max": 5}', "/d")
    assert both == {"ngram": {"method": "ngram", "disable_by_batch_size": 64, "prompt_lookup_max": 5},
                    "redrafter": {"method": "redrafter", "disable_by_batch_size": 64, "beam_width": 2,
                                  "prompt_lookup_max": 5, "drafter_path": "/d"}}
    assert spec.spec_configs(None, '{"method": "ngram", "num_speculative_tokens": 6}', None) == \
        {"ngram": {"method": "ngram", "num_speculative_tokens": 6}}
    for methods, text in [(["ngram", "ngram"], None), (["eagle"], None), (None, "[1]"), (None, "{"),
                          (None, '{"disable_by_batch_size": 0}'), (None, '{"nope": 1}'),
                          (["ngram"], '{"beam_width": 2}')]:
        with pytest.raises(ConfigError):
            spec.spec_configs(methods, text, None)


def test_missing_drafter_is_a_note_not_a_crash(tmp_path):
    why = spec.missing_drafter({"method": "redrafter"}, "no-such-model")
    assert "no drafter ships" in why and "train-drafter" in why
    assert "not a directory" in spec.missing_drafter({"drafter_path": str(tmp_path / "x")}, "m")
    assert spec.missing_drafter({"drafter_path": str(tmp_path)}, "m") is None


def test_batch_sizes_and_names_flags():
    from paraserve.server.cli import build_parser

    args = build_parser().parse_args(["bench", "spec", "--batch-sizes", "1,4", "--methods", "ngram"])
    assert args.batch_sizes == [1, 4] and args.methods == ["ngram"]
    assert args.prompt_sets == ["chat", "code"] and args.output_len == 128
    for bad in ("0,4", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            spec._sizes(bad)


def test_step_breakdown_refuses_workers_in_other_processes_before_loading():
    from paraserve.server.cli import build_parser

    assert build_parser().parse_args(["bench", "spec"]).step_breakdown is False
    for extra in (["--tensor-parallel-size", "2"], ["--distributed-executor-backend", "mp"]):
        args = build_parser().parse_args(["bench", "spec", "--step-breakdown", *extra])
        with pytest.raises(ValueError, match="--step-breakdown times the engine's worker in this process"):
            spec.run(args)


# ---- figures and the table ---------------------------------------------------------------------

def test_mismatches_find_the_first_difference():
    assert spec.mismatches([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == []
    assert spec.mismatches([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5, 6]]) == [
        {"request": 0, "first_difference": 1, "plain_tokens": 3, "spec_tokens": 3},
        {"request": 1, "first_difference": 2, "plain_tokens": 2, "spec_tokens": 3}]


def test_speculation_label():
    assert spec.speculation_label(8, 8, 0) == "on"
    assert spec.speculation_label(32, 8, 0) == "off (>8)"
    assert spec.speculation_label(32, 8, 5) == "off (>8), tail on"


def test_figures_and_table_row():
    plain = spec.Run(2.0, 20, 2.5, [[1] * 11, [2] * 11]) + spec.Run(1.0, 10, 1.2, [[3] * 6])
    assert plain.decode_s == 3.0 and plain.decode_tokens == 30 and len(plain.outputs) == 3
    fast = spec.Run(1.0, 30, 1.4, [[1] * 11, [2] * 11, [3] * 5], num_drafts=10, num_draft_tokens=40,
                    num_accepted_tokens=20)
    fig = spec.figures(plain, fast, 1, 8)
    assert fig["plain"]["decode_tokens_per_s"] == 10.0 and fig["spec"]["decode_tokens_per_s"] == 30.0
    assert fig["speedup"] == 3.0 and fig["mean_accepted_length"] == 3.0 and fig["acceptance_rate"] == 0.5
    assert fig["plain"]["output_tokens"] == 28 and fig["plain"]["output_tokens_per_request"] == [11, 11, 6]
    assert fig["mismatches"] == [{"request": 2, "first_difference": 5, "plain_tokens": 6, "spec_tokens": 5}]
    row = spec.table_row({"method": "ngram", "prompts": "code", **fig})
    assert row == ["ngram", "code", 1, "on", 10.0, 30.0, "3.00x", 3.0, 0.5, 28, "NO: 1/3 differ"]
    assert len(row) == len(spec.HEADERS)
    # no drafts (speculation off): no acceptance figures, not zeros
    off = spec.figures(plain, spec.Run(3.0, 30, 4.0, plain.outputs), 32, 8)
    assert off["mean_accepted_length"] is None and off["acceptance_rate"] is None
    assert spec.table_row({"method": "m", "prompts": "chat", **off})[3:] == \
        ["off (>8)", 10.0, 10.0, "1.00x", None, None, 28, "yes"]


def test_rounds_pool_their_runs_and_show_their_range():
    """--num-iters: the figures pool every round's tokens and time (not an average of ratios), and
    the speedup cell adds the range of the rounds' own speedups."""
    out = [[1] * 5]
    rounds = [(spec.Run(2.0, 20, 2.0, out), spec.Run(1.0, 20, 1.0, out, num_drafts=10, num_accepted_tokens=10)),
              (spec.Run(2.0, 20, 2.0, out), spec.Run(0.5, 20, 0.5, out, num_drafts=10, num_accepted_tokens=10)),
              (spec.Run(4.0, 20, 4.0, out), spec.Run(1.0, 20, 1.0, out, num_drafts=10, num_accepted_tokens=10))]
    fig = spec.pooled_figures(rounds, 1, 8)
    assert fig["speedup_per_iter"] == [2.0, 4.0, 4.0] and fig["speedup_median"] == 4.0 and fig["rounds"] == 3
    assert fig["speedup"] == 8.0 / 2.5  # 60 tokens in 8 s against 60 in 2.5 s
    assert fig["requests"] == 3 and fig["plain"]["decode_tokens"] == 60 and fig["mean_accepted_length"] == 2.0
    assert spec.table_row({"method": "ngram", "prompts": "chat", **fig})[6] == "3.20x (2.00-4.00)"
    one = spec.pooled_figures(rounds[:1], 1, 8)  # one round: the plain figures, no range
    assert one == {**spec.figures(*rounds[0], 1, 8), "rounds": 1, "speedup_per_iter": [2.0], "speedup_median": 2.0}
    assert spec.table_row({"method": "ngram", "prompts": "chat", **one})[6] == "2.00x"


def test_step_breakdown_per_step_figures_and_the_bound_without_drafting():
    """--step-breakdown: phases per timed step in ms, tokens per step, and the speedup were drafting
    free (the speculative step charged plain sampling's cost instead of its verification)."""
    plain = spec.Run(1.0, 100, 1.1, [[1] * 101], phase_s={
        "step": 1.0, "preparation": 0.01, "forward": 0.7, "lm_head": 0.2, "sampling": 0.05, "drafting": 0.001},
        timed_steps=100)
    fast = spec.Run(0.6, 120, 0.7, [[1] * 101], num_drafts=50, num_accepted_tokens=70, phase_s={
        "step": 0.6, "preparation": 0.01, "forward": 0.35, "forward_modules": 0.02, "lm_head": 0.08,
        "verification": 0.03, "drafting": 0.1, "search": 0.08}, timed_steps=50)
    b = spec.figures(plain, fast, 1, 8)["step_ms"]
    assert b["plain"]["step"] == pytest.approx(10.0) and b["plain"]["tokens_per_step"] == 1.0
    assert b["plain"]["other"] == pytest.approx(10.0 - 0.1 - 7.0 - 2.0 - 0.5 - 0.01)
    assert b["plain"]["verification"] == 0.0 and b["plain"]["search"] == 0.0
    s = b["spec"]
    assert s["forward"] == pytest.approx(7.4)  # the stack's and the modules' forward: one phase
    assert (s["step"], s["drafting"], s["search"], s["tokens_per_step"]) == pytest.approx((12.0, 2.0, 1.6, 2.4))
    assert s["other"] == pytest.approx(12.0 - 0.2 - 7.4 - 1.6 - 0.6 - 2.0)
    assert b["speedup"] == pytest.approx(2.0)  # 2.4 tokens in 12 ms against 1 in 10
    # without drafting: 12 - 2 (drafting) - 0.6 (verification) + 0.5 (plain sampling) = 9.9 ms
    assert b["speedup_without_drafting"] == pytest.approx(2.4 / 9.9 / 0.1)
    row = spec.table_row({"method": "redrafter", "prompts": "chat", **spec.figures(plain, fast, 1, 8)})
    assert len(row) == len(spec.HEADERS + spec.BREAKDOWN_HEADERS)
    assert row[-4:-1] == pytest.approx([10.0, 12.0, 2.0]) and row[-1] == "2.42x"
    # pooled rounds add their phases; runs timed without it carry no breakdown
    pooled = spec.pooled_figures([(plain, fast), (plain, fast)], 1, 8)
    assert pooled["step_ms"]["spec"] == pytest.approx(s) and pooled["step_ms"]["speedup"] == pytest.approx(2.0)
    assert pooled["step_ms_per_iter"] == [b, b]
    assert "step_ms" not in spec.figures(spec.Run(1.0, 10, 1.0, [[1]]), spec.Run(1.0, 10, 1.0, [[1]]), 1, 8)


def test_step_timer_times_an_engines_decode_steps_and_comes_off(tiny_model_dir):
    from paraserve import LLM, SamplingParams
    from paraserve.bench.step_timer import PHASES, StepTimer, per_step_ms

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=256, threads=1,
              speculative_config={"method": "ngram", "disable_by_batch_size": 64})
    engine, runner = llm.engine, llm.engine.worker.runner
    prompt = [5, 6, 7, 8, 9] * 6  # repeats: prompt lookup drafts
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    before = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    timer = StepTimer(engine)
    assert {"_prepare", "_sample", "_verify", "_propose"} <= set(vars(runner))
    try:
        plain = spec.run_requests(engine, [prompt], dataclasses.replace(params, speculative=False), timer)
        fast = spec.run_requests(engine, [prompt], params, timer)
    finally:
        timer.remove()
    # the prefill step is not timed: one step per later token without speculation
    assert plain.timed_steps == plain.decode_tokens == 15
    assert 1 <= fast.timed_steps <= 15 and fast.num_drafts > 0
    p, s = per_step_ms(plain.phase_s, plain.timed_steps), per_step_ms(fast.phase_s, fast.timed_steps)
    assert set(p) == set(PHASES) | {"search", "step"}
    assert all(p[k] > 0 for k in ("preparation", "forward", "lm_head", "sampling", "step"))
    assert p["verification"] == 0.0 and s["verification"] > 0 and s["drafting"] > 0
    assert p["other"] >= 0 and s["other"] >= 0
    assert s["step"] == pytest.approx(sum(s[k] for k in PHASES))
    # off again: the classes' methods, and the engine runs as before
    assert not {"_prepare", "_sample", "_verify", "_propose"} & set(vars(runner))
    assert "compute_logits" not in vars(runner.model) and "forward" not in vars(runner.model)
    assert plain.outputs == fast.outputs == [list(before)]
    assert llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids == before


# ---- end to end on a tiny random model ---------------------------------------------------------

def test_spec_bench_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "spec.json"
    r = subprocess.run(
        [sys.executable, "-m", "paraserve.server.cli", "bench", "spec",
         "--model", str(tiny_model_dir("llama")),
         "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "512", "--threads", "1",
         "--batch-sizes", "1,3", "--num-prompts", "2", "--output-len", "12", "--num-iters", "2",
         "--speculative-config", '{"disable_by_batch_size": 2}', "--step-breakdown", "--output-json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "paraserve bench spec: model " in r.stdout and "torch threads" in r.stdout
    # no drafter ships for the tiny model: redrafter is skipped with a note, ngram still runs
    assert "note: skipping redrafter: no drafter ships" in r.stderr
    assert "skipped redrafter" in r.stdout and "spec" in r.stderr  # the note and the progress bar
    data = json.loads(out.read_text())
    res = data["results"]
    assert data["benchmark"] == "spec" and list(res["skipped"]) == ["redrafter"]
    assert res["greedy_identical"] is True and res["prompt_sets"] == {"chat": 32, "code": 32}
    assert res["speculative_configs"]["ngram"]["disable_by_batch_size"] == 2
    runs = res["runs"]
    assert [(x["prompts"], x["batch_size"], x["requests"]) for x in runs] == \
        [("chat", 1, 4), ("chat", 3, 6), ("code", 1, 4), ("code", 3, 6)]  # two rounds each
    for x in runs:
        assert x["rounds"] == 2 and len(x["speedup_per_iter"]) == 2 and x["speedup_median"] > 0
        assert x["mismatches"] == []
        assert x["plain"]["output_tokens_per_request"] == x["spec"]["output_tokens_per_request"]
        assert all(1 <= n <= 12 for n in x["plain"]["output_tokens_per_request"])
        assert x["plain"]["decode_tokens_per_s"] > 0 and x["spec"]["decode_tokens_per_s"] > 0
    on = [x for x in runs if x["batch_size"] == 1]
    assert all(x["speculation"] == "on" and x["num_drafts"] > 0 and x["mean_accepted_length"] >= 1
               for x in on)
    # batch 3 > disable_by_batch_size 2: off (until EOS leaves 2 or fewer running: "tail on")
    assert all(x["speculation"].startswith("off (>2)") for x in runs if x["batch_size"] == 3)
    assert [row[10] for row in data["table"]["rows"]] == ["yes"] * 4
    # --step-breakdown: ms per decode step and the bound without drafting, the phases in the JSON
    assert data["table"]["headers"][-4:] == spec.BREAKDOWN_HEADERS
    assert all(x["step_ms"]["spec"]["forward"] > 0 and x["step_ms"]["speedup_without_drafting"] > 0 for x in runs)
    assert "step breakdown:" in r.stdout
    assert all(" (" in row[6] and row[6].endswith(")") for row in data["table"]["rows"])  # the rounds' range
    assert "2 rounds, pooled" in r.stdout


def test_a_correctness_failure_makes_the_command_exit_1(monkeypatch):
    import paraserve.bench as bench
    from paraserve.bench import report as rp

    machine = {"cpu_model": "c", "cpu_count": 1, "torch_threads": 1, "torch_version": "t",
               "transformers_version": "t", "dtype": "float32", "model": "m"}
    for ok, code in ((True, 0), (False, 1)):
        report = rp.Report("spec", machine, {}, ["a"], [], {}, ok=ok)
        monkeypatch.setattr(spec, "run", lambda args, report=report: report)
        monkeypatch.setattr(rp, "write_json", lambda report, path: None)
        assert bench.main(argparse.Namespace(bench_command="spec", output_json="x.json")) == code
