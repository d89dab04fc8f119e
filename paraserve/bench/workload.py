"""Benchmark workloads: seeded, pure Python, made of token ids.

Prompts are random token ids drawn from the vocabulary minus special tokens. Ids rather than
text so that a prompt of P tokens is exactly P tokens for paraserve, for the HTTP server and for
transformers alike (sampled text would re-tokenize to other lengths), and so that no two prompts
share a prefix by accident (which would turn a throughput run into a prefix-cache run).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

# vLLM's "random" dataset bounds for the mixed workload: chat-like prompts, medium answers
MIXED_INPUT_RANGE = (16, 512)
MIXED_OUTPUT_RANGE = (16, 256)


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    output_len: int  # generated with ignore_eos, so exactly this many tokens

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def usable_token_ids(vocab_size: int, special_ids: Iterable[int]) -> list[int]:
    """Ids a prompt may contain: all of [0, vocab_size) except special/control tokens."""
    special = set(special_ids)
    ids = [i for i in range(vocab_size) if i not in special]
    if not ids:
        raise ValueError("the vocabulary has no ordinary tokens to build prompts from")
    return ids


def random_prompt(rng: random.Random, token_ids: Sequence[int], length: int) -> tuple[int, ...]:
    if length < 1:
        raise ValueError(f"a prompt needs at least 1 token, got {length}")
    return tuple(rng.choice(token_ids) for _ in range(length))


def fixed_workload(num_prompts: int, input_len: int, output_len: int, token_ids: Sequence[int],
                   seed: int) -> list[BenchRequest]:
    _check_count(num_prompts, output_len)
    rng = random.Random(f"fixed:{seed}")
    return [BenchRequest(random_prompt(rng, token_ids, input_len), output_len) for _ in range(num_prompts)]


def mixed_workload(num_prompts: int, token_ids: Sequence[int], seed: int,
                   input_range: tuple[int, int] = MIXED_INPUT_RANGE,
                   output_range: tuple[int, int] = MIXED_OUTPUT_RANGE) -> list[BenchRequest]:
    """Prompt and output lengths uniform (inclusive) in their ranges, in arrival order."""
    _check_count(num_prompts, output_range[0])
    rng = random.Random(f"mixed:{seed}")
    out = []
    for _ in range(num_prompts):
        p, o = rng.randint(*input_range), rng.randint(*output_range)
        out.append(BenchRequest(random_prompt(rng, token_ids, p), o))
    return out


def build_workload(mixed: bool, num_prompts: int, input_len: int, output_len: int,
                   token_ids: Sequence[int], seed: int) -> list[BenchRequest]:
    if mixed:
        return mixed_workload(num_prompts, token_ids, seed)
    return fixed_workload(num_prompts, input_len, output_len, token_ids, seed)


def prefix_workload(prefix_len: int, num_turns: int, turn_len: int, token_ids: Sequence[int],
                    seed: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """One shared system prompt and `num_turns` distinct short user turns to append to it."""
    _check_count(num_turns, turn_len)
    rng = random.Random(f"prefix:{seed}")
    prefix = random_prompt(rng, token_ids, prefix_len)
    return prefix, [random_prompt(rng, token_ids, turn_len) for _ in range(num_turns)]


def describe(workload: Sequence[BenchRequest]) -> dict:
    """Token counts of a workload, for the report and its JSON."""
    p = [r.prompt_len for r in workload]
    o = [r.output_len for r in workload]
    return {"num_requests": len(workload), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "prompt_len_min": min(p), "prompt_len_max": max(p),
            "output_len_min": min(o), "output_len_max": max(o)}


def check_fits(workload: Iterable[BenchRequest], max_model_len: int) -> None:
    """ignore_eos runs must reach their full length, or token counts stop being comparable."""
    longest = max(r.prompt_len + r.output_len for r in workload)
    if longest > max_model_len:
        raise ValueError(f"a request needs {longest} tokens of context but --max-model-len is "
                         f"{max_model_len}: shorten the workload or raise --max-model-len")


def _check_count(n: int, length: int) -> None:
    if n < 1:
        raise ValueError(f"the workload needs at least 1 request, got {n}")
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
