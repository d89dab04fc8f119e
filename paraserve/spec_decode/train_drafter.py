"""`paraserve train-drafter`: self-distillation of a ReDrafter drafter from its base model.

Recipe. The frozen base model answers the chat prompts shipped in prompts.txt (through the
engine, with its chat template, greedy by default); one teacher-forced forward over each
prompt + response gives the final hidden state h_t at every position. At each response
position t the drafter gets (h_t, x_{t+1}), x_{t+1} being the token the base model's logits at t
chose, and learns x_{t+2} .. x_{t+K+1}, teacher-forced (the recurrence reads the true tokens),
with the cross-entropy summed over the K offsets. The vocabulary projection is restricted to the
tokens most frequent in the generated data and starts from the base model's LM head rows.

Held-out prompts measure what speculation would achieve: at every position of their greedy
responses, beam search (width W, length L) drafts from (h_t, x_{t+1}); the accepted length is the
longest prefix of any beam that matches the base model's greedy continuation, plus the bonus
token, which is what tree verification accepts at that step.

torch is imported inside functions, so that `paraserve --help` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

from paraserve.config import ConfigError

if TYPE_CHECKING:
    import torch

    from paraserve.spec_decode.redrafter import ReDrafter

logger = logging.getLogger("paraserve")

PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "prompts.txt")
REPORT_FILE = "train_report.json"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainDrafterConfig:
    out: str = _f(None, "directory to write the drafter to (required)")
    prompts_file: Optional[str] = _f(None, "one user request per line (default: the shipped prompts.txt)")
    num_prompts: Optional[int] = _f(None, "training prompts (default: all but the held-out ones)")
    num_heldout: int = _f(32, "held-out prompts for the accepted-length report")
    max_tokens: int = _f(192, "max response tokens per prompt")
    temperature: float = _f(0.0, "sampling temperature of the training responses (held-out: greedy)")
    epochs: int = _f(4, "passes over the training positions")
    batch_size: int = _f(256, "positions per training step")
    lr: float = _f(1e-3, "peak AdamW learning rate (warmup, then cosine decay)")
    beam_width: int = _f(4, "beams in the held-out evaluation")
    beam_length: int = _f(4, "draft length: training offsets K and evaluation beam length L")
    draft_vocab_size: Optional[int] = _f(8192, "drafted vocabulary: the most frequent tokens of the "
                                                "generated data (0: the whole vocabulary)")
    num_blocks: int = _f(2, "residual blocks in the drafter head")
    init_from_lm_head: bool = _f(True, "start the vocabulary projection from the base LM head rows")
    train_seed: int = _f(0, "seed of the prompt split, the drafter init and the training order")

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("train-drafter needs --out DIR")
        positive = ("num_heldout", "max_tokens", "epochs", "batch_size", "beam_width", "beam_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.temperature < 0 or self.lr <= 0:
            raise ConfigError("--temperature must be >= 0 and --lr > 0")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ConfigError(f"--draft-vocab-size must be >= 0, got {self.draft_vocab_size}")


@dataclass
class Sample:
    token_ids: list[int]  # prompt + response
    prompt_len: int


@dataclass
class TrainReport:
    path: str
    num_train_positions: int
    final_loss: float
    accepted_length: float  # mean over held-out positions: best of W beams, + 1 bonus
    accepted_length_top_beam: float  # beam 0 alone (a chain draft)
    vocab_coverage: float  # share of held-out response tokens the drafter can draft
    seconds: dict[str, float]


# ---- CLI -----------------------------------------------------------------------------------

def add_args(parser: argparse.ArgumentParser) -> None:
    """Training flags, from TrainDrafterConfig (engine flags such as --model and --dtype are
    added by the caller)."""
    g = parser.add_argument_group("drafter training")
    for f in dataclasses.fields(TrainDrafterConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        shown = text if "default:" in text or f.name == "out" else f"{text} (default: {f.default})"
        if f.type in (bool, "bool"):
            g.add_argument(flag, dest=f.name, default=f.default, help=shown,
                           action=argparse.BooleanOptionalAction)
            continue
        t = str(f.type)
        kind = int if "int" in t else float if "float" in t else str
        g.add_argument(flag, dest=f.name, type=kind, default=f.default, help=shown,
                       required=f.name == "out")


def run(args: argparse.Namespace, engine_args: dict[str, Any]) -> int:
    cfg = TrainDrafterConfig(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(TrainDrafterConfig)})
    train_drafter(cfg, engine_args)
    return 0


# ---- the pipeline --------------------------------------------------------------------------

def train_drafter(cfg: TrainDrafterConfig, engine_args: dict[str, Any]) -> TrainReport:
    from paraserve.llm import LLM
    from paraserve.spec_decode.redrafter import load_drafter, save_drafter

    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = time.monotonic() - clock, time.monotonic()

    _check_out(cfg.out)  # before minutes of work, not after
    train_prompts, heldout_prompts = split_prompts(cfg)
    if engine_args.get("kv_cache_memory") is None:
        # generation needs a few hundred MB; zeroing the default share of RAM takes seconds
        engine_args = {**engine_args, "kv_cache_memory": "1GiB"}
    llm = LLM(**engine_args)
    model, name = llm.engine.worker.model, llm.engine.source.name
    lap("load")
    logger.info("train-drafter: %d training + %d held-out prompts, up to %d tokens each",
                len(train_prompts), len(heldout_prompts), cfg.max_tokens)
    train, heldout = generate(llm, train_prompts, heldout_prompts, cfg)
    lap("generate")
    train_h, heldout_h = hidden_states(model, train), hidden_states(model, heldout)
    lap("hidden")
    drafter = new_drafter(cfg, model, name, train)
    data = make_examples(train, train_h, drafter.token_ids, model.config.vocab_size, cfg.beam_length)
    logger.info("drafter: %.1fM parameters, %d drafted tokens; %d training positions",
                sum(p.numel() for p in drafter.parameters()) / 1e6, len(drafter.token_ids), len(data[0]))
    loss = fit(drafter, data, model.embed_tokens, cfg)
    lap("train")
    save_drafter(drafter, cfg.out)
    saved = load_drafter(cfg.out, name, model.config.vocab_size, model.config.hidden_size)
    acc, acc_top = evaluate(saved, heldout, heldout_h, model.embed_tokens, cfg.beam_width, cfg.beam_length)
    coverage = vocab_coverage(heldout, saved.token_ids)
    lap("evaluate")
    logger.info("held-out mean accepted length (W=%d, L=%d): %.2f tokens/step (top beam only: %.2f); "
                "the draft vocabulary holds %.1f%% of held-out response tokens",
                cfg.beam_width, cfg.beam_length, acc, acc_top, 100 * coverage)
    report = TrainReport(cfg.out, len(data[0]), loss, acc, acc_top, coverage, seconds)
    with open(os.path.join(cfg.out, REPORT_FILE), "w") as f:  # how this drafter was made
        json.dump({"train": dataclasses.asdict(cfg), "report": dataclasses.asdict(report)}, f, indent=2)
        f.write("\n")
    logger.info("saved drafter to %s; time: %s", cfg.out,
                ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return report


def new_drafter(cfg: TrainDrafterConfig, model, name: str, train: list[Sample]) -> "ReDrafter":
    """An untrained drafter for `model`: its vocabulary the most frequent response tokens, its
    vocabulary projection (optionally) the base LM head's rows for them."""
    import torch

    from paraserve.spec_decode.redrafter import ReDrafter, ReDrafterConfig

    V = model.config.vocab_size
    token_ids = frequent_tokens(train, V, cfg.draft_vocab_size or None)
    restricted = len(token_ids) < V
    config = ReDrafterConfig(base_model=name, base_vocab_size=V, hidden_size=model.config.hidden_size,
                             num_blocks=cfg.num_blocks, draft_vocab_size=len(token_ids) if restricted else None)
    torch.manual_seed(cfg.train_seed)
    drafter = ReDrafter(config, token_ids if restricted else None)
    if cfg.init_from_lm_head:
        with torch.no_grad():
            drafter.lm_head.weight.copy_(model.lm_head.weight[drafter.token_ids].float())
    return drafter


def _check_out(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out directory {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--out directory {path} is not writable")


def split_prompts(cfg: TrainDrafterConfig) -> tuple[list[str], list[str]]:
    path = cfg.prompts_file or PROMPTS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {path}: {e.strerror}") from e
    if len(prompts) < cfg.num_heldout + 1:
        raise ConfigError(f"{path} has {len(prompts)} prompts; need more than --num-heldout {cfg.num_heldout}")
    random.Random(cfg.train_seed).shuffle(prompts)
    heldout, train = prompts[:cfg.num_heldout], prompts[cfg.num_heldout:]
    return train[:cfg.num_prompts], heldout


def generate(llm, train_prompts: list[str], heldout_prompts: list[str],
             cfg: TrainDrafterConfig) -> tuple[list[Sample], list[Sample]]:
    """The base model's own responses; held-out ones greedy (what acceptance is measured on)."""
    from paraserve.sampling_params import SamplingParams

    def chat(prompts: list[str], temperature: float) -> list[Sample]:
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=temperature, seed=None)
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        return [Sample(list(o.prompt_token_ids) + list(o.outputs[0].token_ids), len(o.prompt_token_ids))
                for o in outs]

    if cfg.temperature == 0:  # one batch: the engine keeps more requests in flight
        both = chat(train_prompts + heldout_prompts, 0.0)
        return both[:len(train_prompts)], both[len(train_prompts):]
    return chat(train_prompts, cfg.temperature), chat(heldout_prompts, 0.0)


def hidden_states(model, samples: list[Sample], max_batch_tokens: int = 2048,
                  block_size: int = 16) -> list["torch.Tensor"]:
    """One teacher-forced forward per batch of samples -> per sample [T, hidden] float32, the
    base model's final hidden states (the rows its logits are computed from)."""
    import torch
    from tqdm import tqdm

    out: list[torch.Tensor] = []
    bar = tqdm(total=sum(len(s.token_ids) for s in samples), desc="Hidden states", unit="tok",
               dynamic_ncols=True)
    with bar:
        for batch in _token_batches(samples, max_batch_tokens):
            hidden = _forward(model, [s.token_ids for s in batch], block_size)
            out.extend(h.float().clone() for h in hidden)  # normal tensors, usable by autograd
            bar.update(sum(len(s.token_ids) for s in batch))
    return out


def _token_batches(samples: list[Sample], max_tokens: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        if batch and sum(len(b.token_ids) for b in batch) + len(s.token_ids) > max_tokens:
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _forward(model, seqs: list[list[int]], block_size: int) -> list["torch.Tensor"]:
    """Fresh prefills of seqs in one forward, into a scratch KV cache (the engine's cache and
    its prefix-cached blocks stay untouched)."""
    import torch

    from paraserve.attention.backend import AttentionMetadata
    from paraserve.attention.forward_context import forward_context

    device = model.embed_tokens.weight.device
    blocks = [-(-len(s) // block_size) for s in seqs]
    first = [0]
    for b in blocks:
        first.append(first[-1] + b)
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.long)
    for i, b in enumerate(blocks):
        tables[i, :b] = torch.arange(first[i], first[i] + b)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    slots = torch.cat([first[i] * block_size + torch.arange(len(s)) for i, s in enumerate(seqs)])
    empty = torch.zeros(0, dtype=torch.long)
    meta = AttentionMetadata(
        num_reqs=len(seqs), positions=positions.to(device), slot_mapping=slots.to(device),
        block_tables=tables.to(device), query_start_loc=starts, seq_lens=[len(s) for s in seqs],
        decode_reqs=empty, decode_tokens=empty, decode_seq_lens=empty,
        other_reqs=list(range(len(seqs))))
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    with torch.inference_mode(), _scratch_kv_cache(model, first[-1], block_size), forward_context(meta):
        hidden = model(ids, meta.positions)  # [T, hidden]
    return [hidden[a:b] for a, b in zip(starts, starts[1:])]


@contextlib.contextmanager
def _scratch_kv_cache(model, num_blocks: int, block_size: int) -> Iterator[None]:
    import torch

    layers = model.attention_layers()
    saved = [layer.kv_cache for layer in layers]
    weight = model.embed_tokens.weight
    try:
        for layer in layers:
            layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                         dtype=weight.dtype, device=weight.device)
        yield
    finally:
        for layer, cache in zip(layers, saved):
            layer.kv_cache = cache


def frequent_tokens(samples: list[Sample], vocab_size: int, keep: Optional[int]) -> "torch.Tensor":
    """The `keep` token ids most frequent in the responses (ties: lower id first), ascending."""
    import torch

    if keep is None or keep >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in samples:
        counts += torch.bincount(torch.tensor(s.token_ids[s.prompt_len:], dtype=torch.long),
                                 minlength=vocab_size)[:vocab_size].double()
    order = torch.argsort(-counts, stable=True)  # stable: ties keep the lower id first
    return order[:keep].sort().values


def make_examples(samples: list[Sample], hidden: list["torch.Tensor"], token_ids: "torch.Tensor",
                  vocab_size: int, K: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Every response position t (from the last prompt token on, with a target left): h_t,
    inputs g = x_{t+1} .. x_{t+K}, targets x_{t+2} .. x_{t+K+1} as drafter rows.
    Returns h [N, H], g [N, K], y [N, K] (-100: past the end, or not in the draft vocabulary)."""
    import torch

    row = torch.full((vocab_size,), -100, dtype=torch.long)
    row[token_ids] = torch.arange(len(token_ids))
    hs, gs, ys = [], [], []
    for s, h in zip(samples, hidden):
        x = torch.tensor(s.token_ids, dtype=torch.long)
        T = len(x)
        t = torch.arange(s.prompt_len - 1, T - 2)  # [n] positions with x_{t+2} in the sample
        if not len(t):
            continue
        offs = t.unsqueeze(1) + torch.arange(1, K + 2)  # [n, K + 1]: t+1 .. t+K+1
        valid = offs < T
        tok = torch.where(valid, x[offs.clamp(max=T - 1)], 0)
        hs.append(h[t])
        gs.append(tok[:, :-1])
        ys.append(torch.where(valid[:, 1:], row[tok[:, 1:]], -100))
    return torch.cat(hs), torch.cat(gs), torch.cat(ys)


def fit(drafter: "ReDrafter", data: tuple, embed, cfg: TrainDrafterConfig) -> float:
    """AdamW over shuffled positions, loss = sum over offsets of the mean cross-entropy.
    Returns the last epoch's mean loss."""
    import math

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    h, g, y = data
    N, K = y.shape
    steps_per_epoch = -(-N // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = min(50, total // 10 + 1)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(i, total) / total))))
    gen = torch.Generator().manual_seed(cfg.train_seed)
    drafter.train()
    epoch_loss = float("nan")
    bar = tqdm(total=total, desc="Training drafter", unit="step", dynamic_ncols=True)
    with bar:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(N, generator=gen)
            run_loss, run_n = 0.0, 0
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                logits = drafter(h[idx], g[idx], embed)  # [b, K, Vd]
                ce = F.cross_entropy(logits.flatten(0, 1).float(), y[idx].flatten(), ignore_index=-100,
                                     reduction="none").view(-1, K)
                valid = (y[idx] != -100).float()
                loss = ((ce * valid).sum(0) / valid.sum(0).clamp(min=1)).sum()  # summed over offsets
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
                opt.step()
                sched.step()
                run_loss += loss.item()
                run_n += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{run_loss / run_n:.3f}")
            epoch_loss = run_loss / max(run_n, 1)
            logger.info("epoch %d/%d: loss %.3f (sum over %d offsets)", epoch + 1, cfg.epochs, epoch_loss, K)
    drafter.eval()
    return epoch_loss


def evaluate(drafter: "ReDrafter", samples: list[Sample], hidden: list["torch.Tensor"], embed,
             width: int, length: int, batch: int = 256) -> tuple[float, float]:
    """Mean accepted length over every response position of greedy samples: the longest matching
    prefix over the beams (tree verification) + 1, and beam 0's alone + 1."""
    import torch

    from paraserve.spec_decode.redrafter import beam_search

    h, g, _ = make_examples(samples, hidden, drafter.token_ids, drafter.config.base_vocab_size, length)
    if not len(h):
        return float("nan"), float("nan")
    ref, valid = _continuations(samples, length)  # [N, L] the greedy continuation after g_0
    best, top = [], []
    for a in range(0, len(h), batch):
        beams = beam_search(drafter, h[a:a + batch], g[a:a + batch, 0], embed, width, length).token_ids
        match = (beams == ref[a:a + batch].unsqueeze(1)) & valid[a:a + batch].unsqueeze(1)  # [b, W, L]
        accepted = match.long().cumprod(-1).sum(-1)  # [b, W]
        best.append(accepted.max(-1).values)
        top.append(accepted[:, 0])
    return (torch.cat(best).float().mean().item() + 1, torch.cat(top).float().mean().item() + 1)


def vocab_coverage(samples: list[Sample], token_ids: "torch.Tensor") -> float:
    import torch

    tokens = torch.tensor([t for s in samples for t in s.token_ids[s.prompt_len:]], dtype=torch.long)
    return float(torch.isin(tokens, token_ids).float().mean()) if len(tokens) else float("nan")


def _continuations(samples: list[Sample], L: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """For make_examples' positions: x_{t+2} .. x_{t+L+1} [N, L], and which exist [N, L]."""
    import torch

    refs, valids = [], []
    for s in samples:
        x = torch.tensor(s.token_ids, dtype=torch.long)
        T = len(x)
        t = torch.arange(s.prompt_len - 1, T - 2)
        if not len(t):
            continue
        offs = t.unsqueeze(1) + torch.arange(2, L + 2)  # [n, L]
        refs.append(x[offs.clamp(max=T - 1)])
        valids.append(offs < T)
    return torch.cat(refs), torch.cat(valids)
