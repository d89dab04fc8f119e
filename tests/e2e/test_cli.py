"""The command line as a user runs it: help, a generation, and one-line errors."""
import json
import subprocess
import sys

import pytest


def paraserve(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "paraserve.server.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_engine_flag_with_default():
    out = paraserve("generate", "--help").stdout
    for flag in ("--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--block-size", "--enable-prefix-caching", "--kv-cache-memory", "--seed", "--threads"):
        assert flag in out
    assert "default: 16" in out  # block size
    top = paraserve("--help").stdout
    assert "generate" in top and "chat" in top


def test_generate_on_tiny_model(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    r = paraserve("generate", str(path), "--prompt", "The quick brown", "--max-tokens", "5",
                  "--ignore-eos", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(line["token_ids"]) == 5 and line["finish_reason"] == "length"
    assert "KV cache" in r.stderr  # capacity is logged at start-up


@pytest.mark.parametrize("args, message", [
    (["/no/such/model"], "does not exist"),
    (["--max-model-len", "0"], "--max-model-len"),
    (["--block-size", "3"], "--block-size"),
    (["--kv-cache-memory", "lots"], "memory size"),
    (["--temperature", "-1"], "temperature"),
])
def test_bad_input_is_one_line_error(args, message, tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    argv = ["generate", *(args if args[0].startswith("/") else [path, *args]), "--prompt", "hi"]
    r = paraserve(*argv)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


def test_chat_streams_a_reply_and_exits_on_eof(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    r = subprocess.run([sys.executable, "-m", "paraserve.server.cli", "chat", path, "--dtype", "float32",
                        "--max-tokens", "8", "--ignore-eos"], input="Hello\nHow are you?\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3  # two turns answered, then the prompt at EOF
    assert "Traceback" not in r.stderr
