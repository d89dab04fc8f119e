"""The baseline: Hugging Face transformers `generate`, run the way a transformers user runs it.

Static batches in arrival order, left padding, greedy, KV cache on. Every request of a batch
generates until the longest one is done (that is what static batching costs), but only the
request's own output length counts as useful work. EOS is kept out with min_new_tokens, so
lengths match paraserve's ignore_eos runs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from transformers.generation.streamers import BaseStreamer

from paraserve.bench.workload import BenchRequest
from paraserve.models.loader import ModelSource


def load_hf_model(source: ModelSource, dtype: torch.dtype,
                  device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # generate() warns about sampling fields of the model's generation config that greedy ignores
    hf_logging.set_verbosity_error()
    if source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    else:
        model = _from_gguf(source.path).to(dtype)
    return model.to(device).eval()


def _from_gguf(path: str) -> torch.nn.Module:
    """transformers' own GGUF loading without `accelerate` (not installed): from_pretrained(
    gguf_file=...) delegates to load_gguf_checkpoint, so call it directly."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    if unexpected or not all("lm_head" in k for k in missing):  # lm_head may be tied
        raise RuntimeError(f"transformers could not load {path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def compile_for_decode(model: torch.nn.Module) -> None:
    """What transformers documents for fast decoding: a static KV cache (fixed shapes) and
    torch.compile of the forward (inductor: C++/OpenMP kernels on CPU). Compiles on first use."""
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, dynamic=False)


class _FirstTokenClock(BaseStreamer):
    """generate() calls put() with the prompt, then once per step: the second call is the
    batch's first token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: Optional[float] = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class HFRun:
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int  # useful: each request's own output length
    generated_tokens: int  # computed: batch size x longest output, padding rows included
    # per request, from the start of its batch (static batching: a batch waits for the previous)
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"elapsed_s": self.elapsed_s, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "generated_tokens": self.generated_tokens,
                "output_tokens_per_s": self.output_tokens / self.elapsed_s,
                "total_tokens_per_s": (self.prompt_tokens + self.output_tokens) / self.elapsed_s,
                "requests_per_s": len(self.e2e_s) / self.elapsed_s}


def pad_token_id(model: torch.nn.Module) -> int:
    cfg = model.generation_config
    for tid in (cfg.pad_token_id, cfg.eos_token_id, 0):
        tid = tid[0] if isinstance(tid, list) else tid
        if tid is not None:
            return int(tid)
    return 0


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, batch: Sequence[BenchRequest]) -> tuple[float, float]:
    """One static batch; returns (seconds to the first token, seconds in all)."""
    width = max(r.prompt_len for r in batch)
    new = max(r.output_len for r in batch)
    pad = pad_token_id(model)
    ids = torch.tensor([[pad] * (width - r.prompt_len) + list(r.prompt_ids) for r in batch])
    mask = torch.tensor([[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in batch])
    clock = _FirstTokenClock()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                         pad_token_id=pad, streamer=clock)
    total = time.perf_counter() - t0
    if out.shape[1] != width + new:  # a short run would flatter the baseline
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, not {new}")
    return (clock.first_token_at or t0 + total) - t0, total


def run_static_batches(model: torch.nn.Module, workload: Sequence[BenchRequest], batch_size: int,
                       desc: str = "transformers") -> HFRun:
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"the transformers batch size must be >= 1, got {batch_size}")
    run = HFRun(0.0, sum(r.prompt_len for r in workload), sum(r.output_len for r in workload), 0)
    with tqdm(total=len(workload), desc=desc, unit="req", dynamic_ncols=True) as bar:
        for start in range(0, len(workload), batch_size):
            batch = workload[start:start + batch_size]
            ttft, total = generate_batch(model, batch)
            run.elapsed_s += total
            run.generated_tokens += len(batch) * max(r.output_len for r in batch)
            run.ttft_s += [ttft] * len(batch)
            run.e2e_s += [total] * len(batch)
            bar.update(len(batch))
    return run


def warmup(model: torch.nn.Module, token_id: int) -> None:
    """First calls pay one-off allocation and kernel selection; keep them out of the timing."""
    generate_batch(model, [BenchRequest((token_id,) * 8, 2)] * 2)
