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
        # candidate ends j in [0, T-2] of an earlier occurrence: t[j] equals the last token
        # (one vectorised pass over the context); then the match length of every candidate
        # at once, one pass per further suffix token over the candidates only
        ends = np.flatnonzero(t[:-1] == t[-1])  # [C] ascending
        run = np.ones(ends.size, dtype=np.int64)  # [C] tokens matched, capped at max_n
        alive = np.ones(ends.size, dtype=bool)
        for i in range(1, max_n):
            alive &= ends >= i
            alive[alive] = t[ends[alive] - i] == t[T - 1 - i]
            if not alive.any():
                break
            run += alive
        best = int(run.max()) if ends.size else 0
        if best < self.min_n:
            return [], 0
        j = int(ends[np.flatnonzero(run == best)[-1]])  # the most recent of the longest
        return t[j + 1: j + 1 + self.k].tolist(), best
