"""What every benchmark shares: flags, the engine under test, prompt vocabulary, cleanup."""
from __future__ import annotations

import argparse
import gc
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paraserve.llm import LLM


def add_common_args(parser: argparse.ArgumentParser, command: str) -> None:
    # the engine flags come from the config dataclasses, as for `serve` (defaults in one place);
    # --seed seeds both the engine and the workload
    from paraserve.server.cli import add_engine_args

    add_engine_args(parser, positional_model=False)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run Hugging Face transformers generate on the same workload in this run "
                        "and report paraserve/transformers (default: on)")
    g.add_argument("--output-json", default=f"bench-{command}.json",
                   help=f"where to write the results (default: bench-{command}.json)")


def engine_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    from paraserve.server.cli import engine_kwargs as cli_engine_kwargs

    return {**cli_engine_kwargs(args), **overrides}


def set_threads(args: argparse.Namespace) -> None:
    """The engine sets torch threads when it loads; the baseline in this process must use the same."""
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)


def make_llm(args: argparse.Namespace, **overrides: Any) -> "LLM":
    from paraserve.llm import LLM

    set_threads(args)
    return LLM(**engine_kwargs(args, **overrides))


def prompt_token_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Ordinary tokens only: special and added tokens (BOS, EOS, chat markers) would change what
    the model does, and ids past the tokenizer's length have untrained embeddings."""
    from paraserve.bench.workload import usable_token_ids

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return usable_token_ids(min(len(tokenizer), vocab_size), special)


def engine_token_ids(llm: "LLM") -> list[int]:
    return prompt_token_ids(llm.tokenizer, llm.engine.hf_config.vocab_size)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def warmup_engine(llm: "LLM", token_ids: list[int], prompt_len: int = 16) -> None:
    """First steps pay one-off allocation and kernel selection; keep them out of the timing.
    Its prompts are unlike the workload's, so they leave nothing in the prefix cache to hit."""
    from paraserve.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": [token_ids[i]] * prompt_len} for i in range(2)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)


def free_memory() -> None:
    """Called after dropping the engine, so the baseline never shares memory with it."""
    gc.collect()


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
