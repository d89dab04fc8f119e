"""Draft proposers: an ABC and a lazy registry.

A proposer looks at each request's tokens so far (and, for a model-based drafter, the base
model's last hidden state) and proposes W candidate continuations (beams) of at most L tokens.
The beams are merged into a prefix tree (tree.py) rooted at the request's last token and
verified in one target forward (rejection_sampler.py).
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Draft:
    """One request's proposal. Beams may be shorter than L, or absent (nothing to propose)."""
    beams: list[list[int]]  # W beams of token ids, continuing after the request's last token
    # q of each drafted token given its beam prefix, for beams sampled independently; None
    # for deterministic drafts (point masses), e.g. prompt lookup or beam search
    draft_probs: Optional[torch.Tensor] = None  # [W, L, V] float

    @property
    def num_tokens(self) -> int:
        return sum(len(b) for b in self.beams)


class Proposer(abc.ABC):
    name: str

    @abc.abstractmethod
    def propose(self, token_ids: Sequence[Sequence[int]],
                hidden_states: Optional[torch.Tensor] = None,
                max_nodes: Optional[Sequence[int]] = None) -> list[Draft]:
        """token_ids: per request, prompt + output so far (the last one is the tree root).
        hidden_states: [B, H] the base model's hidden state at each request's last token, for
        drafters that read it; model-free proposers ignore it. max_nodes: per request, the most
        draft tokens (tree nodes) to propose; None: the proposer's own limits only. Returns one
        Draft per request."""


_PROPOSERS = {
    "ngram": "paraserve.spec_decode.ngram:NgramProposer",
    "redrafter": "paraserve.spec_decode.redrafter:ReDrafterProposer",  # imported on first use
}


def get_proposer(name: str, **kwargs) -> Proposer:
    """Instantiate a registered proposer; kwargs go to its constructor."""
    if name not in _PROPOSERS:
        raise ValueError(f"unknown draft proposer {name!r}; choose from {sorted(_PROPOSERS)}")
    module, cls = _PROPOSERS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
