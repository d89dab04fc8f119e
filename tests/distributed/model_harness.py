"""Run a model the way the model runner does, for multi-process tests: build it from a checkpoint
through the normal loader (each rank keeps its shard), bind a paged KV cache sized by the
rank's own KV heads, prefill several prompts in one batch, then take batched greedy decode
steps, each inside forward_context(AttentionMetadata)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from paraserve.attention.backend import AttentionMetadata, get_backend
from paraserve.attention.forward_context import forward_context
from paraserve.models.loader import iter_weights, load_hf_config, resolve_model
from paraserve.models.registry import get_model_class

BLOCK = 4


class ReadCounter:
    """Wraps iter_weights: counts the checkpoint elements the loaders actually read."""

    def __init__(self, weights) -> None:
        self.weights = weights
        self.elements = 0

    def __iter__(self):
        for name, loaded in self.weights:
            yield name, _Counted(loaded, self) if not isinstance(loaded, torch.Tensor) else loaded


class _Counted:
    def __init__(self, sl, counter: ReadCounter) -> None:
        self.sl, self.counter = sl, counter

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, index):
        t = self.sl[index]
        self.counter.elements += t.numel()
        return t


def load_model(path, backend: str = "torch", max_positions: int = 256,
               counter: Optional[list] = None, weights: Optional[list] = None,
               **model_kw) -> torch.nn.Module:
    """float32 model of `path` (HF dir or .gguf) for this rank's parallel state. With `counter`
    (a list), the ReadCounter of the load is appended to it. `weights`: the (name, tensor)
    pairs of iter_weights(path), read once by the parent (dequantizing a GGUF file takes
    seconds) and shared by forked ranks; each rank's loaders still slice them."""
    src = resolve_model(str(path))
    config = load_hf_config(src)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = get_model_class(config)(config, get_backend(backend), max_positions, **model_kw)
    finally:
        torch.set_default_dtype(old)
    reader = ReadCounter(iter_weights(src, lazy=True) if weights is None else weights)
    model.load_weights(reader)
    if counter is not None:
        counter.append(reader)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model.eval()


def _metadata(computed: list[int], new: list[int], tables: list[list[int]]) -> AttentionMetadata:
    starts, positions, slots = [0], [], []
    for c, n, table in zip(computed, new, tables):
        starts.append(starts[-1] + n)
        positions.extend(range(c, c + n))
        slots.extend(table[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n))
    seq_lens = [c + n for c, n in zip(computed, new)]
    decode = [i for i, n in enumerate(new) if n == 1]
    return AttentionMetadata(
        num_reqs=len(new), positions=torch.tensor(positions, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.long), query_start_loc=starts,
        seq_lens=seq_lens, decode_reqs=torch.tensor(decode, dtype=torch.long),
        decode_tokens=torch.tensor([starts[i] for i in decode], dtype=torch.long),
        decode_seq_lens=torch.tensor([seq_lens[i] for i in decode], dtype=torch.long),
        other_reqs=[i for i, n in enumerate(new) if n != 1])


@torch.inference_mode()
def greedy(model, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill all prompts in one batch, then `steps` batched greedy decode steps.

    Returns per request the logits [len(prompt) + steps, vocab] (every prompt position, then
    each decode step) and its steps + 1 greedy tokens.
    """
    n = len(prompts)
    per_req = -(-(max(map(len, prompts)) + steps + 1) // BLOCK)
    tables = [[j * n + i for j in range(per_req)] for i in range(n)]  # requests' blocks interleave
    for attn in model.attention_layers():
        attn.kv_cache = torch.zeros(2, n * per_req, BLOCK, attn.num_kv_heads, attn.head_dim)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    ids = [tok for p in prompts for tok in p]
    computed, new = [0] * n, [len(p) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps + 1):
        meta = _metadata(computed, new, tables)
        with forward_context(meta):
            hidden = model(torch.tensor(ids, dtype=torch.long), meta.positions)
        out = model.compute_logits(hidden)  # [T, vocab]
        for i in range(n):
            rows = out[meta.query_start_loc[i]:meta.query_start_loc[i + 1]]
            logits[i].append(rows)
            tokens[i].append(int(rows[-1].argmax()))
        computed = [c + m for c, m in zip(computed, new)]
        new = [1] * n
        ids = [t[-1] for t in tokens]
    return [torch.cat(rows) for rows in logits], tokens


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The reference run in the parent, at one thread like the ranks (and the shared cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
