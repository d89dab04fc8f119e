"""Tree verification: which drafts the target model accepts, and the one token after them.

Pure tensor functions over a batch of requests (PackedTrees, node 0 = root, see tree.py):
no .item() and no data-dependent shapes, so on GPU the caller's read of the result is the one
host sync. Python loops run over the static beam width W and length L, or node count N only.
The engine's greedy rows take verify_greedy_rows, the same rule walked on Python lists from the
argmax's one host read: cheaper than ~20 tiny tensor ops at the few trees a step holds.

Sampling rule, and why it is lossless. One speculative step (Leviathan et al. 2023, "Fast
inference from transformers via speculative decoding"; Chen et al. 2023, "Accelerating large
language model decoding with speculative sampling"): a draft x ~ q is accepted with probability
min(1, p(x)/q(x)), otherwise a token is drawn from the residual r = norm(max(p - q, 0)). Then
P(y) = min(q(y), p(y)) + (1 - sum_x min(q(x), p(x))) r(y) = min(q, p)(y) + max(p - q, 0)(y)
= p(y). Recursive rejection over siblings (SpecInfer's multi-step speculative sampling, Miao et
al. 2023; multi-draft: SpecTr, Sun et al. 2023): instead of drawing from r, run the same step
against target r with the next sibling draft x' ~ q'. That step outputs a draw from r, so the
whole outputs a draw from p, by induction over the siblings, PROVIDED x' is independent of
everything decided so far. Hence:
  * siblings are tried per beam, in beam order, not per deduplicated child: two independently
    sampled beams may draw the same token at a node, and the second try still updates the
    residual (merging them would skip exactly the draws equal to x, which biases the output).
    For deterministic drafts (q a point mass) a repeated try is a no-op: after rejecting x,
    p(x) = 0 and max(p - onehot(x), 0) = p. The rule then reads: accept x with p(x), else zero
    p(x), renormalise and try the next distinct child.
  * after accepting x at node u, the candidates at x are the beams through x not tried yet;
    given everything verified so far their next tokens are fresh draws from q(. | path, x),
    so the argument repeats at x against p(. | path, x). The last token is drawn from the
    residual at the node where all tries were rejected, or (bonus) from p at the last accepted
    node when no candidate is left: both are the target's conditional, so the emitted sequence
    is distributed as the target's, one token at a time.
draft_probs is the distribution each beam token was drawn from given its prefix, for beams
sampled independently of each other. Beam-search (ReDrafter) or prompt-lookup drafts are
deterministic: pass None, which is lossless whatever chose them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from paraserve.layers.sampler import inverse_cdf
from paraserve.spec_decode.tree import PackedTrees


@dataclass
class VerifyOutput:
    num_accepted: torch.Tensor  # [B] int64 draft tokens accepted, in 0..L
    accepted_nodes: torch.Tensor  # [B, L] int64 accepted path, root excluded; 0 past num_accepted
    # accepted drafts then the bonus/resampled token at [num_accepted]; 0 after it
    output_token_ids: torch.Tensor  # [B, L + 1] int64
    last_node: torch.Tensor  # [B] int64 deepest accepted node (0: the root, nothing accepted)

    def rows(self) -> list[list[int]]:
        """Per tree, one list: [num_accepted, last_node, accepted_nodes (L), output_token_ids
        (L + 1)] (one host read)."""
        return torch.cat([self.num_accepted.unsqueeze(1), self.last_node.unsqueeze(1), self.accepted_nodes,
                          self.output_token_ids], 1).tolist()

    @classmethod
    def from_rows(cls, rows: list[list[int]], L: int, device: Optional[torch.device] = None) -> "VerifyOutput":
        t = torch.tensor(rows, dtype=torch.int64, device=device).view(len(rows), 2 * L + 3)
        return cls(t[:, 0], t[:, 2:2 + L], t[:, 2 + L:], t[:, 1])


def verify_greedy(target_logits: torch.Tensor, trees: PackedTrees) -> VerifyOutput:
    """target_logits: [B, N, V] (row i predicts the token after node i), after any processing
    that can change the argmax. Emits exactly what greedy decoding with these logits would."""
    return verify_greedy_argmax(target_logits.argmax(-1), trees)  # Sampler's tie-break


def verify_greedy_argmax(argmax: torch.Tensor, trees: PackedTrees) -> VerifyOutput:
    """verify_greedy from the target's argmax per node, [B, N]: the engine takes it from the
    flat logits with the CPU argmax kernel rather than gathering [B, N, V] logits first."""
    ok = trees.node_tokens == argmax.gather(1, trees.node_parents)  # [B, N]
    ok[:, 0] = True
    real = trees.attn_mask.diagonal(dim1=1, dim2=2)  # [B, N]; False on padding nodes
    # accepted = the node and all its ancestors match; siblings carry distinct tokens, so
    # at most one child per node matches and the accepted nodes form one root path
    accepted = real & ~(trees.attn_mask & ~ok.unsqueeze(1)).any(-1)  # [B, N]
    last = torch.where(accepted, trees.node_depths, -1).argmax(-1)  # [B]
    return _finish(trees, last, argmax.gather(1, last.unsqueeze(1)).squeeze(1))


def verify_greedy_rows(argmax: list[int], trees: PackedTrees) -> list[list[int]]:
    """verify_greedy_argmax from the flat argmax per node as a list ([T], tree after tree),
    walked on the trees' lists: at the few small trees a speculative step holds, ~20 tiny
    tensor ops cost ~0.3 ms more than the walk (the argmax's .tolist() is the one host sync).
    Returns VerifyOutput.rows()'s layout."""
    L = trees.beam_length
    out = []
    for start, tree in zip(trees.query_start_loc, trees.trees):
        tok, par, dep = tree.tokens, tree.parent, tree.depth
        accepted = [True] + [False] * (tree.num_nodes - 1)
        deepest = 0
        for i in range(1, tree.num_nodes):  # parents come first, and siblings carry distinct tokens
            if accepted[par[i]] and tok[i] == argmax[start + par[i]]:
                accepted[i] = True
                if dep[i] > dep[deepest]:
                    deepest = i
        path, i = [], deepest
        while i:
            path.append(i)
            i = par[i]
        path.reverse()
        pad = [0] * (L - len(path))
        out.append([len(path), deepest] + path + pad + [tok[i] for i in path] + [argmax[start + deepest]] + pad)
    return out


def verify_greedy_lists(argmax: list[int], trees: PackedTrees) -> VerifyOutput:
    """verify_greedy_rows as a VerifyOutput."""
    return VerifyOutput.from_rows(verify_greedy_rows(argmax, trees), trees.beam_length, trees.device)


def verify_sampling(target_probs: torch.Tensor, trees: PackedTrees,
                    draft_probs: Optional[torch.Tensor] = None,
                    generators: Optional[dict[int, torch.Generator]] = None) -> VerifyOutput:
    """target_probs: [B, N, V] float, the target's distribution after each node, after the
    request's temperature/top-k/top-p (greedy rows may pass one_hot(argmax): the result is then
    verify_greedy's). draft_probs: [B, W, L, V], or None when every row's drafts are
    deterministic (a deterministic row in a batch that has draft_probs passes one_hot of its
    draft tokens). generators: request row -> its own generator (seeded requests)."""
    if draft_probs is None:
        return _verify_point_masses(target_probs, trees, generators or {})
    B, N, V = target_probs.shape
    W, L = trees.unpack.shape[1:]
    dev = target_probs.device
    u = torch.rand(B, W, L, device=dev)  # acceptance coins
    e = torch.empty(B, V, device=dev).exponential_()  # the final draw's exponential race
    for i, g in (generators or {}).items():
        # the row's own W x L coins, not the batch's padded ones: a seeded request consumes
        # the same numbers whatever else is in its batch, so its tokens do not change
        w, l = trees.beam_shapes[i]
        u[i, :w, :l] = torch.rand(w, l, generator=g, device=dev)
        e[i] = torch.empty(V, device=dev).exponential_(generator=g)

    def at(t: torch.Tensor, node: torch.Tensor) -> torch.Tensor:  # [B, N, ...], [B] -> [B, ...]
        return t.gather(1, node.reshape(B, 1, *([1] * (t.dim() - 2))).expand(B, 1, *t.shape[2:])
                        ).squeeze(1)

    cur = torch.zeros(B, dtype=torch.int64, device=dev)  # deepest accepted node so far
    p = target_probs[:, 0].float()  # [B, V] what the next token must be drawn from
    for w in range(W):
        for l in range(L):
            node = trees.unpack[:, w, l]  # [B]
            tries = trees.unpack_valid[:, w, l] & (at(trees.node_parents, node) == cur)
            x = at(trees.node_tokens, node).unsqueeze(1)  # [B, 1]
            q = (torch.zeros_like(p).scatter_(1, x, 1.0) if draft_probs is None
                 else draft_probs[:, w, l].float())  # [B, V]
            accept = tries & _accept(u[:, w, l], p.gather(1, x).squeeze(1),
                                     q.gather(1, x).squeeze(1))
            reject = (tries & ~accept).unsqueeze(1)
            cur = torch.where(accept, node, cur)
            p = torch.where(accept.unsqueeze(1), at(target_probs, node).float(),
                            torch.where(reject, _residual(p, q), p))
    token = (p / e.clamp_(min=torch.finfo(e.dtype).tiny)).argmax(-1)  # a draw from p
    return _finish(trees, cur, token)


def _verify_point_masses(target_probs: torch.Tensor, trees: PackedTrees,
                         generators: dict[int, torch.Generator]) -> VerifyOutput:
    """verify_sampling for deterministic drafts, node by node: the rule of the module docstring
    with q a point mass. A node is tried when its parent is the deepest accepted node so far;
    it is accepted with probability r(x) = p(x) / (1 - m), where p is the target at its parent
    and m the mass of the siblings rejected before it (r is p with their tokens zeroed, i.e. the
    residual after each point-mass rejection). The final token is drawn from p at the last
    accepted node with its rejected children's tokens zeroed. Scalars per node instead of [V]
    vectors per (beam, position): siblings are distinct tokens in a tree, so each is tried once."""
    B, N, V = target_probs.shape
    dev = target_probs.device
    real = trees.attn_mask.diagonal(dim1=1, dim2=2)  # [B, N]; False on padding nodes
    u = torch.rand(B, N, device=dev)  # a coin per node
    for i, g in generators.items():
        # the row's own coins, one per node of its tree, not the batch's padded ones: a seeded
        # request consumes the same numbers whatever else is in its batch
        n = int(real[i].sum())
        u[i, :n] = torch.rand(n, generator=g, device=dev)
    # p(x) of each node's token under the target at its parent
    px = target_probs.reshape(B, N * V).gather(1, trees.node_parents * V + trees.node_tokens).float()
    cur = torch.zeros(B, dtype=torch.int64, device=dev)  # deepest accepted node so far
    mass = torch.zeros(B, device=dev)  # target mass of cur's children rejected so far
    rejected = torch.zeros(B, N, dtype=torch.bool, device=dev)
    for i in range(1, N):  # topological order: a node's parent is decided before it
        tries = real[:, i] & (trees.node_parents[:, i] == cur)
        accept = tries & _accept(u[:, i], px[:, i], 1.0 - mass)
        reject = tries & ~accept
        cur = torch.where(accept, i, cur)
        mass = torch.where(accept, 0.0, torch.where(reject, _drop(mass, px[:, i]), mass))
        rejected[:, i] = reject
    p = target_probs[torch.arange(B, device=dev), cur].float()  # [B, V]
    drop = rejected & (trees.node_parents == cur.unsqueeze(1))  # cur's rejected children
    p = torch.cat([p, p.new_zeros(B, 1)], 1).scatter_(1, torch.where(drop, trees.node_tokens, V), 0.0)
    # the sampler's own draw (one uniform per row; an exponential race costs V draws)
    return _finish(trees, cur, inverse_cdf(p[:, :V], generators))


def _drop(mass: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """[B]: the target mass removed once a point-mass draft x with p(x) = px is rejected (the
    residual norm(max(p - onehot(x), 0)) is p without x)."""
    return mass + px


def _accept(u: torch.Tensor, px: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """[B] each: accept with probability min(1, p(x)/q(x)), written without dividing by q."""
    return u * qx < px


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, V]: norm(max(p - q, 0)), the target given that the draft from q was rejected."""
    r = (p - q).clamp_(min=0)
    s = r.sum(-1, keepdim=True)  # [B, 1]
    # s == 0 means p == q, where a rejection only happens by rounding: keep p
    return torch.where(s > 0, r / s.clamp(min=torch.finfo(r.dtype).tiny), p)


def _finish(trees: PackedTrees, last: torch.Tensor, token: torch.Tensor) -> VerifyOutput:
    """Path from the root to `last` [B], plus the final token [B] emitted after it."""
    B, N = trees.node_tokens.shape
    L = trees.unpack.shape[2]
    rows = torch.arange(B, device=last.device)
    on_path = trees.attn_mask[rows, last] & (trees.node_depths > 0)  # [B, N]
    slot = torch.where(on_path, trees.node_depths - 1, L)  # off-path nodes go to a spare column
    ids = torch.arange(N, device=last.device).expand(B, N)
    nodes = torch.zeros(B, L + 1, dtype=torch.int64, device=last.device)
    nodes = nodes.scatter_(1, slot, ids)[:, :L]  # [B, L]
    num = trees.node_depths[rows, last]  # [B]
    pos = torch.arange(L + 1, device=last.device).unsqueeze(0)  # [1, L + 1]
    tokens = torch.cat([trees.node_tokens.gather(1, nodes), token.new_zeros(B, 1)], 1)
    tokens = torch.where(pos < num.unsqueeze(1), tokens, 0)  # [B, L + 1]
    tokens = tokens.scatter_(1, num.unsqueeze(1), token.unsqueeze(1))
    nodes = torch.where(pos[:, :L] < num.unsqueeze(1), nodes, 0)
    return VerifyOutput(num, nodes, tokens, last)
