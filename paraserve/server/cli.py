"""`paraserve` command line: serve, generate, chat.

Engine flags are generated from the config dataclasses, so defaults live in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Optional, Sequence

from paraserve.config import ConfigError, engine_fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = True) -> None:
    group = parser.add_argument_group("engine")
    for f in engine_fields():
        help_text = f.metadata.get("help", "")
        if f.name == "model" and positional_model:
            parser.add_argument("model", nargs="?", default=None, help=help_text)
            group.add_argument("--model", dest="model_flag", default=None, help="same as MODEL")
            continue
        shown = help_text if "default:" in help_text else f"{help_text} (default: {f.default})"
        kw: dict[str, Any] = {"default": f.default, "help": shown}
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _arg_type(f)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f.name), dest=f.name, **kw)


def _arg_type(f: dataclasses.Field):
    t = str(f.type)
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out = {f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)}
    if getattr(args, "model_flag", None):
        out["model"] = args.model_flag
    return out


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="0 disables (default: 0)")
    g.add_argument("--min-p", type=float, default=0.0, help="(default: 0.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0)")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (default: none)")
    g.add_argument("--stop", action="append", default=None, help="stop string, repeatable (default: none)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS (default: off)")


def sampling_params(args: argparse.Namespace):
    from paraserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    from paraserve.config import ServerConfig

    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host})")
    g.add_argument("--port", type=int, default=d.port, help=f"port; 0 picks a free one (default: {d.port})")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests allowed to wait beyond --max-num-seqs before 429 (default: {d.max_queue})")
    g.add_argument("--graceful-timeout", type=float, default=d.graceful_timeout,
                   help=f"seconds running requests get to finish on SIGTERM (default: {d.graceful_timeout})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paraserve", description="LLM inference and serving engine",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_server_args(serve)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text, repeatable")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    add_sampling_args(gen)
    chat = sub.add_parser("chat", help="terminal chat with streaming output")
    add_engine_args(chat)
    chat.add_argument("--system", default=None, help="system prompt (default: the template's)")
    add_sampling_args(chat)
    from paraserve.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from paraserve.spec_decode.train_drafter import add_args as add_train_drafter_args

    train = sub.add_parser("train-drafter", help="distil a ReDrafter drafter from the model's own answers")
    add_engine_args(train, positional_model=False)
    add_train_drafter_args(train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            from paraserve.server.chat import run_chat

            return run_chat(args, engine_kwargs(args), sampling_params(args))
        if args.command == "bench":
            from paraserve.bench import main as run_bench

            return run_bench(args)
        if args.command == "train-drafter":
            from paraserve.spec_decode.train_drafter import run as run_train_drafter

            return run_train_drafter(args, engine_kwargs(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from paraserve.models.loader import ModelLoadError

        if isinstance(e, (ConfigError, ValueError, ModelLoadError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


def _serve(args: argparse.Namespace) -> int:
    from paraserve.config import EngineConfig
    from paraserve.engine.async_engine import AsyncLLM
    from paraserve.llm import _setup_logging
    from paraserve.config import ServerConfig
    from paraserve.server.api_server import run_server

    if args.max_queue < 0 or not 0 <= args.port < 65536:
        raise ConfigError("--max-queue must be >= 0 and --port in [0, 65535]")
    _setup_logging()
    engine = AsyncLLM(EngineConfig.from_kwargs(**engine_kwargs(args)))
    return run_server(engine, ServerConfig(args.host, args.port, args.api_key, args.max_queue,
                                           args.graceful_timeout))


def _generate(args: argparse.Namespace) -> int:
    from paraserve.llm import LLM

    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    if args.chat:
        convs = [[{"role": "user", "content": p}] for p in args.prompt]
        outputs = llm.chat(convs, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for prompt, out in zip(args.prompt, outputs):
        o = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}))
        else:
            print(f"--- {prompt}\n{o.text}\n[{len(o.token_ids)} tokens, finish: {o.finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
