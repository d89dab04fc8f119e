"""Speculative decoding as the model runner uses it: after a step, a draft tree for each request
that decodes next (proposer + tree.py); in the next step, once the model has run the tree,
which drafts the target accepts (rejection_sampler.py) against the distribution the sampler
would have drawn from.

What is lossless, and what is not drafted. Greedy rows accept a draft when it is the argmax of
the (logit_bias-processed) logits, so their output is plain greedy decoding's; sampling rows use
the tree-aware rejection rule against the request's own distribution after temperature, top-k,
top-p, min-p and logit_bias (rejection_sampler.py explains the rule). Repetition, frequency and
presence penalties and min_tokens depend on the tokens before each row, which differ along each
path of a tree: requests that use them are not drafted for and decode as without speculation.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch

from paraserve.config import SpecConfig
from paraserve.layers.sampler import (SamplingMetadata, SamplingRow, argmax, process_logits,
                                      sampling_probs)
from paraserve.sampling_params import SamplingParams
from paraserve.spec_decode.proposer import Proposer, get_proposer
from paraserve.spec_decode.rejection_sampler import verify_greedy_rows, verify_sampling
from paraserve.spec_decode.tree import DraftTree, PackedTrees

logger = logging.getLogger("paraserve")


class Speculator:
    def __init__(self, config: SpecConfig, model: torch.nn.Module, model_name: str,
                 vocab_size: int) -> None:
        self.method = config.method
        self.vocab_size = vocab_size
        self.proposer = build_proposer(config, model, model_name)
        self.tree_context_budget = config.tree_context_budget
        self.step_draft_budget = config.step_draft_budget
        # ReDrafter reads the base model's final hidden state at the row that chose the last token
        self.needs_hidden_states = config.method == "redrafter"

    @staticmethod
    def eligible(params: SamplingParams, num_output_tokens: int) -> bool:
        """Whether to draft for a request (see the module docstring for why not always)."""
        return (params.speculative and params.repetition_penalty == 1.0
                and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0
                and num_output_tokens >= params.min_tokens)

    def propose(self, token_ids: Sequence[list[int]], max_depths: Sequence[int],
                hidden_states: Optional[torch.Tensor]) -> list[Optional[DraftTree]]:
        """token_ids: per request, prompt + output (the last token is the tree's root);
        max_depths: per request, the most draft tokens one path may hold (what max_tokens leaves);
        hidden_states: [B, H] for ReDrafter. Returns a tree per request, None when nothing."""
        drafts = self.proposer.propose(token_ids, hidden_states, self.max_nodes(token_ids))
        trees: list[Optional[DraftTree]] = []
        for tokens, depth, draft in zip(token_ids, max_depths, drafts):
            beams = [b[:depth] for b in draft.beams]
            trees.append(DraftTree.from_beams(tokens[-1], beams) if any(beams) else None)
        return trees

    def max_nodes(self, token_ids: Sequence[list[int]]) -> Optional[list[int]]:
        """Per request, the most draft nodes its tree may hold: every node attends over the
        whole context, so a verification's extra attention grows as nodes x context length
        (SpecConfig.tree_context_budget bounds that product), and every node is one more row of
        the step's weight products (SpecConfig.step_draft_budget bounds the step's nodes, shared
        evenly). None: no bound."""
        context, step = self.tree_context_budget, self.step_draft_budget
        if not context and not step:
            return None
        share = max(1, step // len(token_ids)) if step else None
        bounds = []
        for t in token_ids:
            by_context = max(1, context // len(t)) if context else None
            bounds.append(min(b for b in (by_context, share) if b is not None))
        return bounds

    def verify(self, logits: torch.Tensor, trees: PackedTrees, rows: list[SamplingRow]) -> list[list[int]]:
        """logits: [T, V] raw logits of every tree node, flat, tree after tree in `trees`' order;
        rows: one per tree, its request's sampling state. Returns, per tree, VerifyOutput.rows():
        [num_accepted, last_node, accepted nodes (L), emitted tokens (L + 1)], L the trees'
        longest beam."""
        if all(r.params.greedy and not r.params.logit_bias for r in rows):
            return verify_greedy_rows(argmax(logits).tolist(), trees)
        per_node = [r for r, n in zip(rows, trees.num_nodes) for _ in range(n)]
        meta = SamplingMetadata.build(per_node, self.vocab_size, logits.device)
        x = process_logits(logits.to(torch.float32, copy=True), meta)  # [T, V]: logit_bias
        if meta.all_greedy:
            return verify_greedy_rows(argmax(x).tolist(), trees)
        greedy = None if meta.greedy_mask is None else argmax(x)  # [T]; before x is scaled
        probs = target_probs(x, meta)  # [T, V]
        if greedy is not None:  # a point mass at the argmax: verify_sampling is then greedy
            onehot = torch.zeros_like(probs).scatter_(1, greedy.unsqueeze(1), 1.0)
            probs = torch.where(meta.greedy_mask.unsqueeze(1), onehot, probs)
        generators = {b: r.generator for b, r in enumerate(rows)
                      if r.generator is not None and not r.params.greedy}
        # ReDrafter's beams and prompt lookup are deterministic drafts: draft_probs None
        return verify_sampling(trees.gather(probs), trees, None, generators).rows()


def target_probs(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The normalised distribution Sampler draws from (x is modified in place)."""
    return sampling_probs(x, meta)


def build_proposer(config: SpecConfig, model: torch.nn.Module, model_name: str) -> Proposer:
    if config.method == "ngram":
        return get_proposer("ngram", num_speculative_tokens=config.num_speculative_tokens,
                            min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max)
    from paraserve.spec_decode.redrafter import load_drafter_config, shipped_drafter_path

    path = config.drafter_path
    if path is None:
        path = shipped_drafter_path(model_name)  # a clear error when none ships
        check_name: Optional[str] = model_name
    else:
        if not os.path.isdir(path):
            raise ValueError(f"speculative-config: drafter_path {path} is not a directory "
                             "(write one with `paraserve train-drafter --out DIR`)")
        # a drafter the user points at may have been trained on another copy of this model:
        # shapes are checked, a different name only warned about
        trained_for = load_drafter_config(path).base_model
        if trained_for.lower() != model_name.lower():
            logger.warning("drafter %s was trained for %r, serving %r", path, trained_for, model_name)
        check_name = None
    return get_proposer("redrafter", model=model, model_name=check_name, drafter_path=path,
                        beam_width=config.beam_width, beam_length=config.beam_length,
                        min_draft_prob=config.min_draft_prob, int8=config.drafter_int8,
                        lookup=get_proposer("ngram", num_speculative_tokens=config.lookup_length,
                                            min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max)
                        if config.lookup_beam else None)
