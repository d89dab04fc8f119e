"""`paraserve bench`: workloads, statistics and formatting on known numbers, and each sub-command
run end to end through the real CLI on a tiny random model. Never asserts on speed."""
import argparse
import json
import statistics
import subprocess
import sys

import pytest

from paraserve.bench import report as rp
from paraserve.bench import workload as wl

VOCAB = wl.usable_token_ids(100, special_ids=[0, 1, 2])


# ---- workloads -------------------------------------------------------------------------------

def test_usable_token_ids_exclude_specials():
    assert VOCAB == list(range(3, 100))
    with pytest.raises(ValueError):
        wl.usable_token_ids(3, [0, 1, 2])


def test_fixed_workload_is_deterministic_and_exact():
    a = wl.fixed_workload(5, 12, 7, VOCAB, seed=3)
    assert a == wl.fixed_workload(5, 12, 7, VOCAB, seed=3)
    assert a != wl.fixed_workload(5, 12, 7, VOCAB, seed=4)
    assert all(r.prompt_len == 12 and r.output_len == 7 for r in a)
    assert all(set(r.prompt_ids) <= set(VOCAB) for r in a)
    assert len({r.prompt_ids for r in a}) == 5  # no shared prompts, so no accidental prefix hits


def test_mixed_workload_is_deterministic_and_within_bounds():
    a = wl.mixed_workload(1000, VOCAB, seed=0)
    assert a == wl.mixed_workload(1000, VOCAB, seed=0)
    assert [r.prompt_len for r in a] != [r.prompt_len for r in wl.mixed_workload(1000, VOCAB, seed=1)]
    p = [r.prompt_len for r in a]
    o = [r.output_len for r in a]
    assert min(p) >= 16 and max(p) <= 512
    assert min(o) >= 16 and max(o) <= 256
    # uniform over the whole range: both ends reached, the mean in the middle
    assert min(p) < 30 and max(p) > 500 and min(o) < 25 and max(o) > 245
    assert abs(statistics.fmean(p) - 264) < 15 and abs(statistics.fmean(o) - 136) < 8
    assert all(set(r.prompt_ids) <= set(VOCAB) for r in a)


def test_prefix_workload_and_describe_and_fits():
    prefix, turns = wl.prefix_workload(50, 3, 5, VOCAB, seed=0)
    assert len(prefix) == 50 and [len(t) for t in turns] == [5, 5, 5] and len(set(turns)) == 3
    assert (prefix, turns) == wl.prefix_workload(50, 3, 5, VOCAB, seed=0)
    work = [wl.BenchRequest((3,) * 10, 4), wl.BenchRequest((4,) * 20, 6)]
    assert wl.describe(work) == {"num_requests": 2, "prompt_tokens": 30, "output_tokens": 10,
                                 "prompt_len_min": 10, "prompt_len_max": 20,
                                 "output_len_min": 4, "output_len_max": 6}
    wl.check_fits(work, 26)
    with pytest.raises(ValueError, match="--max-model-len"):
        wl.check_fits(work, 25)
    with pytest.raises(ValueError):
        wl.fixed_workload(0, 10, 10, VOCAB, seed=0)


# ---- statistics and formatting --------------------------------------------------------------

def test_percentile_on_known_numbers():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert rp.percentile(xs, 0) == 1.0 and rp.percentile(xs, 100) == 4.0
    assert rp.percentile(xs, 50) == 2.5
    assert rp.percentile(xs, 99) == pytest.approx(3.97)
    assert rp.percentile([7.0], 99) == 7.0
    assert rp.stats(list(map(float, range(1, 102)))) == {"mean": 51.0, "p50": 51.0, "p99": 100.0}
    with pytest.raises(ValueError):
        rp.percentile([], 50)


def test_fmt_and_verdict():
    assert [rp.fmt(x) for x in (None, 3, 1234.56, 12.3456, 0.123456, "x")] == \
        ["-", "3", "1234.6", "12.35", "0.123", "x"]
    assert rp.verdict(2.0, higher_is_better=True) == "2.00x faster"
    assert rp.verdict(2.0, higher_is_better=False) == "2.00x slower"
    assert rp.verdict(0.25, higher_is_better=False) == "4.00x faster"
    assert rp.verdict(None, True) == "-"
    assert rp.comparison_row("tok/s", 300.0, 150.0, True) == ["tok/s", 300.0, 150.0, 2.0, "2.00x faster"]


def test_format_table_aligns_columns():
    text = rp.format_table(["metric", "a", "bb"], [["x", 1.5, 100.0], ["longer", None, "ok"]])
    assert text.splitlines() == [
        "metric      a     bb",
        "------  -----  -----",
        "x       1.500  100.0",
        "longer      -     ok",
    ]
    with pytest.raises(ValueError):
        rp.format_table(["a", "b"], [["only one"]])


def _report() -> rp.Report:
    machine = {"cpu_model": "Test CPU", "cpu_count": 2, "torch_threads": 2, "torch_version": "2.x",
               "transformers_version": "5.x", "cuda": None, "dtype": "float32", "model": "m"}
    return rp.Report("throughput", machine, {"num_prompts": 2}, rp.COMPARISON_HEADERS,
                     [rp.comparison_row("output tokens/s", 10.0, 5.0, True)],
                     {"paraserve": {"output_tokens_per_s": 10.0}, "ratio": float("nan")}, ["workload: w"])


def test_report_render_has_header_note_and_table():
    text = _report().render()
    assert "Test CPU | 2 cores | 2 torch threads | torch 2.x" in text
    assert "model m, dtype float32" in text and rp.NOISE_NOTE in text
    assert "output tokens/s" in text and "2.00x faster" in text


def test_report_json_round_trip(tmp_path):
    path = tmp_path / "r.json"
    r = _report()
    r.results["ratio"] = 2.0
    rp.write_json(r, str(path))
    back = json.loads(path.read_text())
    assert back["benchmark"] == "throughput" and back["machine"]["cpu_count"] == 2
    assert back["config"] == {"num_prompts": 2} and back["results"]["ratio"] == 2.0
    assert back["table"]["headers"] == rp.COMPARISON_HEADERS
    assert back["table"]["rows"] == [["output tokens/s", 10.0, 5.0, 2.0, "2.00x faster"]]


def test_concurrency_levels_and_serve_flags():
    from paraserve.bench.serve import parse_levels
    from paraserve.bench.server_process import serve_flags

    assert parse_levels("1,4,16") == [1, 4, 16]
    for bad in ("", "a,b", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)
    from paraserve.server.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--model", "/m", "--max-num-seqs", "8",
                                      "--no-enable-prefix-caching", "--dtype", "float32"])
    assert serve_flags(args) == ["--model", "/m", "--dtype", "float32", "--no-enable-prefix-caching",
                                 "--max-num-seqs", "8"]


# ---- end to end through the CLI on a tiny random model ----------------------------------------

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "1024"]


def bench(cwd, *args, timeout=240):
    r = subprocess.run([sys.executable, "-m", "paraserve.server.cli", "bench", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r


def check_header(stdout: str, command: str) -> None:
    assert f"paraserve bench {command}: model " in stdout and "dtype float32" in stdout
    assert "cores" in stdout and "torch threads" in stdout and rp.NOISE_NOTE in stdout


def test_throughput_mixed_with_baseline(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    r = bench(tmp_path, "throughput", "--model", model, *ENGINE, "--mixed", "--num-prompts", "3",
              "--hf-batch-size", "2")
    check_header(r.stdout, "throughput")
    for row in ("elapsed (s)", "requests/s", "output tokens/s", "total tokens/s"):
        assert row in r.stdout
    assert "Processed prompts" in r.stderr and "transformers" in r.stderr  # progress bars
    data = json.loads((tmp_path / "bench-throughput.json").read_text())
    assert data["benchmark"] == "throughput" and data["config"]["mixed"] is True
    assert data["machine"]["dtype"] == "float32" and data["machine"]["cpu_count"] >= 1
    res = data["results"]
    assert res["workload"]["output_tokens"] == res["paraserve"]["output_tokens"] \
        == res["transformers"]["output_tokens"]
    for side in ("paraserve", "transformers", "ratio"):
        for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
            assert res[side][key] > 0


def test_throughput_fixed_without_baseline(tiny_model_dir, tmp_path):
    out = tmp_path / "t.json"
    r = bench(tmp_path, "throughput", "--model", str(tiny_model_dir("llama")), *ENGINE, "--num-prompts", "3",
              "--input-len", "20", "--output-len", "5", "--no-baseline", "--output-json", str(out))
    check_header(r.stdout, "throughput")
    assert "output tokens/s" in r.stdout
    data = json.loads(out.read_text())
    res = data["results"]
    assert res["transformers"] is None and res["ratio"] is None and data["config"]["baseline"] is False
    assert res["paraserve"]["output_tokens"] == 15 and res["paraserve"]["prompt_tokens"] == 60
    assert res["paraserve"]["output_tokens_per_s"] > 0
    assert data["table"]["rows"][2][2:] == [None, None, "-"]  # no baseline, no ratio


def test_latency_fixed(tiny_model_dir, tmp_path):
    out = tmp_path / "lat.json"
    r = bench(tmp_path, "latency", "--model", str(tiny_model_dir("llama")), *ENGINE, "--input-len", "24",
              "--output-len", "6", "--num-iters", "2", "--output-json", str(out))
    check_header(r.stdout, "latency")
    assert "TTFT mean (ms)" in r.stdout and "decode tokens/s median" in r.stdout
    res = json.loads(out.read_text())["results"]
    for side in ("paraserve", "transformers"):
        assert len(res[side]["iterations"]) == 2
        for key in ("ttft_s_mean", "ttft_s_median", "decode_tokens_per_s_mean", "decode_tokens_per_s_median"):
            assert res[side][key] > 0
    assert all(it["output_tokens"] == 6 for it in res["paraserve"]["iterations"])


def test_baseline_compile_sets_a_static_cache_and_compiles_lazily(tiny_model_dir):
    """--baseline-compile: transformers' documented fast-decode recipe (static cache, compiled
    forward); compiling happens on the first call, which the bench times as its warm-up."""
    import torch

    from paraserve.bench import hf_baseline
    from paraserve.models.loader import resolve_model

    model = hf_baseline.load_hf_model(resolve_model(str(tiny_model_dir("llama"))), torch.float32,
                                      torch.device("cpu"))
    eager = model.forward
    hf_baseline.compile_for_decode(model)
    assert model.generation_config.cache_implementation == "static"
    assert model.forward is not eager and hasattr(model.forward, "_torchdynamo_orig_callable")


def test_prefix_hits_the_cache(tiny_model_dir, tmp_path):
    r = bench(tmp_path, "prefix", "--model", str(tiny_model_dir("llama")), *ENGINE, "--prefix-len", "200",
              "--num-turns", "3", "--turn-len", "10", "--max-tokens", "2")
    check_header(r.stdout, "prefix")
    assert "prefix caching on" in r.stdout and "prefix caching off" in r.stdout
    res = json.loads((tmp_path / "bench-prefix.json").read_text())["results"]
    on, off = res["caching_on"], res["caching_off"]
    assert len(on["ttft_s"]) == len(off["ttft_s"]) == len(res["transformers"]["ttft_s"]) == 3
    assert on["ttft_s_mean"] > 0 and off["ttft_s_mean"] > 0 and res["speedup_mean_ttft"] > 0
    # every turn finds the 200-token system prompt's 12 full blocks cached; caching off looks nothing up
    assert on["prefix_queries"] == 3 * 210 and on["prefix_hits"] == 3 * 192
    assert off["prefix_queries"] == 0


def test_serve_sweep_against_a_real_server(tiny_model_dir, tmp_path):
    r = bench(tmp_path, "serve", "--model", str(tiny_model_dir("llama")), *ENGINE, "--num-prompts", "4",
              "--input-len", "16", "--output-len", "4", "--concurrency-sweep", "1,2", "--plot",
              str(tmp_path / "sweep.png"))
    check_header(r.stdout, "serve")
    assert "c=1" in r.stdout and "c=2" in r.stdout and "TTFT p99 (ms), transformers" in r.stdout
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "sweep.png").stat().st_size > 0
    except ImportError:
        assert "pip install matplotlib" in r.stderr
    res = json.loads((tmp_path / "bench-serve.json").read_text())["results"]
    assert res["levels"] == [1, 2]
    for c in ("1", "2"):
        ours = res["paraserve"][c]
        assert ours["requests"] == 4 and ours["errors"] == 0 and ours["output_tokens"] == 16
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert 0 < ours[key]["p50"] <= ours[key]["p99"]
        assert ours["output_tokens_per_s"] > 0 and res["transformers"][c]["output_tokens_per_s"] > 0
        assert res["ratio_output_tokens_per_s"][c] > 0


def test_a_killed_benchmark_takes_its_server_down(tiny_model_dir, tmp_path):
    """SIGKILL runs no cleanup in the benchmark: the server it started must still go (it gets
    SIGTERM, its graceful shutdown, when its parent dies)."""
    import os
    import signal
    import time

    script = ("import sys\nfrom paraserve.bench.server_process import ServerProcess\n"
              f"s = ServerProcess(['--model', {str(tiny_model_dir('llama'))!r}, *{ENGINE!r}])\n"
              "print(s.proc.pid, flush=True)\nimport time\ntime.sleep(600)\n")
    bench_proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        server_pid = int(bench_proc.stdout.readline())
        os.kill(server_pid, 0)  # serving
        bench_proc.kill()
        bench_proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                break
            try:  # reap it if it became our child's zombie under a subreaper
                os.waitpid(server_pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        else:
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail("the server outlived the benchmark that started it")
    finally:
        bench_proc.kill()
