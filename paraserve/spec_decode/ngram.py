"""Prompt-lookup drafts: continue the text the way it continued last time.

The last n tokens (n from max_n down to min_n) are looked up in the request's earlier tokens
(prompt + output); the up to k tokens that followed their most recent earlier occurrence are
the draft. No model and no training; strong where the output copies its input (code edits,
RAG, extraction). Drafts are deterministic, so verification treats them as point masses.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from paraserve.spec_decode.proposer import Draft, Proposer


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, num_speculative_tokens: int = 4, min_n: int = 1, max_n: int = 3):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.k = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[Sequence[int]],
                hidden_states: Optional[torch.Tensor] = None,
                max_nodes: Optional[Sequence[int]] = None) -> list[Draft]:
        out = []
        for i, tokens in enumerate(token_ids):
            draft = self.lookup(np.asarray(tokens, dtype=np.int64))
            if max_nodes is not None:
                draft = draft[:max_nodes[i]]
            out.append(Draft(beams=[draft] if draft else []))
        return out

    def lookup(self, t: np.ndarray) -> list[int]:
        """t: [T] token ids -> up to k tokens following the latest earlier occurrence of the
        longest matching suffix of length in [min_n, max_n]; [] when none occurs."""
        return self.match(t)[0]

    def match(self, t: np.ndarray) -> tuple[list[int], int]:
        """lookup(t) and the length of the suffix it matched (0 when none): a longer match is
        copied on more often (ReDrafterProposer weighs the draft by it)."""
        T = len(t)
        max_n = min(self.max_n, T - 1)  # a suffix needs an earlier occurrence to match
        if max_n < self.min_n:
            return [], 0
        # run[j]: how many tokens ending at j equal the suffix's last ones (capped at max_n),
        # for every candidate end j in [0, T-2] at once: max_n vectorised passes, not
        # a Python loop over the context
        run = np.zeros(T - 1, dtype=np.int64)  # [T - 1]
        alive = np.ones(T - 1, dtype=bool)
        for i in range(max_n):
            eq = np.zeros(T - 1, dtype=bool)
            eq[i:] = t[: T - 1 - i] == t[T - 1 - i]  # t[j - i] == t[T - 1 - i] for j >= i
            alive &= eq
            if not alive.any():
                break
            run += alive
        for n in range(max_n, self.min_n - 1, -1):
            ends = np.flatnonzero(run >= n)
            if ends.size:
                j = int(ends[-1])  # the most recent occurrence
                return t[j + 1: j + 1 + self.k].tolist(), n
        return [], 0
