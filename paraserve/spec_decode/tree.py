"""Draft beams -> one prefix tree per request, verified by the base model in one forward.

Root convention: node 0 is the root, carrying the last verified token (sampled at the previous
step; its KV is not in the cache yet). A tree of N nodes is fed to the model as N new tokens,
node i at position `num_computed_tokens + depths[i]`, and gives N logit rows: row i predicts
the token after node i (row 0 the first draft token, the row at the last accepted node the
bonus token). Draft nodes 1..N-1 are in topological order (a parent's index is smaller than
its children's), so a node's ancestors sit left of it and a path's nodes ascend by depth.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class DraftTree:
    token_ids: torch.Tensor  # [N] int64; [0] is the root
    parents: torch.Tensor  # [N] int64; parents[0] = 0: the root is its own parent
    depths: torch.Tensor  # [N] int64; position offset from the root (root 0)
    attn_mask: torch.Tensor  # [N, N] bool; [i, j]: j is i or an ancestor of i
    # beam w's token l (depth l + 1) is node unpack[w, l]; beams may be shorter than L
    unpack: torch.Tensor  # [W, L] int64; 0 (the root) where unpack_valid is False
    unpack_valid: torch.Tensor  # [W, L] bool

    @property
    def num_nodes(self) -> int:
        return self.token_ids.shape[0]

    @classmethod
    def from_beams(cls, root_token: int, beams: Sequence[Sequence[int]]) -> "DraftTree":
        """Merge W beams (token lists, possibly of different lengths, possibly empty) into a
        prefix tree: a shared prefix is stored, and verified, once."""
        tokens, parents, depths = [root_token], [0], [0]
        child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        max_len = max((len(b) for b in beams), default=0)
        unpack = [[0] * max_len for _ in beams]
        for w, beam in enumerate(beams):
            node = 0
            for l, tok in enumerate(beam):
                key = (node, int(tok))
                if key not in child:  # nodes are created in beam order: parents come first
                    child[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                    depths.append(l + 1)
                node = unpack[w][l] = child[key]
        n = len(tokens)
        rows = [[True] + [False] * (n - 1)]
        for i in range(1, n):  # a node sees what its parent sees, and itself
            rows.append(rows[parents[i]].copy())
            rows[i][i] = True
        lengths = torch.tensor([len(b) for b in beams], dtype=torch.int64)  # [W]
        return cls(
            token_ids=torch.tensor(tokens, dtype=torch.int64),
            parents=torch.tensor(parents, dtype=torch.int64),
            depths=torch.tensor(depths, dtype=torch.int64),
            attn_mask=torch.tensor(rows, dtype=torch.bool),
            unpack=torch.tensor(unpack, dtype=torch.int64).view(len(beams), max_len),
            unpack_valid=torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1),
        )

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes (n >= 1), e.g. when the step's token budget has no room for all:
        a tree again, since a parent precedes its children. Beams end where they leave it."""
        if n >= self.num_nodes:
            return self
        valid = self.unpack_valid & (self.unpack < n)  # node ids grow along a beam: a prefix stays
        return DraftTree(self.token_ids[:n], self.parents[:n], self.depths[:n],
                         self.attn_mask[:n, :n], torch.where(valid, self.unpack, 0), valid)

    def path(self, node: int) -> tuple[int, ...]:
        """Draft tokens from the root (excluded) down to node."""
        out = []
        while node != 0:
            out.append(int(self.token_ids[node]))
            node = int(self.parents[node])
        return tuple(reversed(out))

    def check_integrity(self) -> None:
        n = self.num_nodes
        if self.parents[0] != 0 or self.depths[0] != 0:
            raise AssertionError("node 0 must be the root: its own parent, depth 0")
        idx = torch.arange(1, n)
        if n > 1 and not bool((self.parents[1:] < idx).all()):
            raise AssertionError("nodes are not in topological order")
        if not torch.equal(self.depths[1:], self.depths[self.parents[1:]] + 1):
            raise AssertionError("a node's depth is not its parent's plus one")
        keys = set(zip(self.parents[1:].tolist(), self.token_ids[1:].tolist()))
        if len(keys) != n - 1:
            raise AssertionError("two siblings carry the same token (prefixes not merged)")
        expect = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            expect[i] |= expect[int(self.parents[i])]
        if not torch.equal(self.attn_mask, expect):
            raise AssertionError("attention mask is not ancestors-or-self")
        u, valid = self.unpack, self.unpack_valid
        if bool((u[~valid] != 0).any()) or bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise AssertionError("unpack map: padding must be 0 and trail the beam")
        if u.shape[1] and not torch.equal(self.depths[u][valid], (torch.arange(u.shape[1]) + 1)
                                          .expand_as(u)[valid]):
            raise AssertionError("unpack map: beam position l must map to depth l + 1")
        if u.shape[1] > 1:  # consecutive beam tokens are parent and child
            both = valid[:, 1:]
            if not torch.equal(self.parents[u[:, 1:]][both], u[:, :-1][both]):
                raise AssertionError("unpack map: a beam is not a root-to-node path")


@dataclass
class PackedTrees:
    """Trees of B requests: flat for the model forward, padded for verification."""
    token_ids: torch.Tensor  # [T] all nodes, request after request: the model's input
    depths: torch.Tensor  # [T] position offsets from each request's root
    query_start_loc: list[int]  # [B + 1] first flat row of each tree
    # padded to N = max nodes, W = max beams, L = max beam length; padding nodes are
    # unreachable: no valid unpack entry points at them and their mask rows/columns are False
    node_tokens: torch.Tensor  # [B, N] int64
    node_parents: torch.Tensor  # [B, N] int64
    node_depths: torch.Tensor  # [B, N] int64
    node_index: torch.Tensor  # [B, N] int64 flat row of each node; padding -> the tree's root
    attn_mask: torch.Tensor  # [B, N, N] bool
    unpack: torch.Tensor  # [B, W, L] int64
    unpack_valid: torch.Tensor  # [B, W, L] bool
    beam_shapes: list[tuple[int, int]]  # [B] each request's own (W, L), before padding

    @property
    def num_nodes(self) -> list[int]:
        q = self.query_start_loc
        return [b - a for a, b in zip(q, q[1:])]

    def request_masks(self) -> dict[int, torch.Tensor]:
        """Request index -> its [n, n] mask: AttentionMetadata.custom_masks."""
        return {b: self.attn_mask[b, :n, :n] for b, n in enumerate(self.num_nodes)}

    def to(self, device: torch.device) -> "PackedTrees":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """[T, ...] per flat node (e.g. logits) -> [B, N, ...] per padded node."""
        return flat[self.node_index]


def pack_trees(trees: Sequence[DraftTree]) -> PackedTrees:
    if not trees:
        raise ValueError("pack_trees needs at least one tree")
    sizes = [t.num_nodes for t in trees]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    n_max = max(sizes)
    w_max = max((t.unpack.shape[0] for t in trees), default=0)
    l_max = max((t.unpack.shape[1] for t in trees), default=0)

    # (padding only where a tree is smaller: at batch 1 each field is one op)
    def pad1(get) -> torch.Tensor:  # [B, N]
        return torch.stack([F.pad(x, (0, n_max - len(x))) if len(x) < n_max else x for x in map(get, trees)])

    def pad2(get, rows: int, cols: int) -> torch.Tensor:  # [B, rows, cols]
        return torch.stack([F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0])) if x.shape != (rows, cols)
                            else x for x in map(get, trees)])

    node = torch.arange(n_max).expand(len(trees), n_max)  # [B, N]
    size = torch.tensor(sizes).unsqueeze(1)  # [B, 1]
    start = torch.tensor(starts[:-1]).unsqueeze(1)  # [B, 1]
    return PackedTrees(
        token_ids=torch.cat([t.token_ids for t in trees]),
        depths=torch.cat([t.depths for t in trees]),
        query_start_loc=starts,
        node_tokens=pad1(lambda t: t.token_ids),
        node_parents=pad1(lambda t: t.parents),
        node_depths=pad1(lambda t: t.depths),
        node_index=start + torch.where(node < size, node, 0),
        attn_mask=pad2(lambda t: t.attn_mask, n_max, n_max),
        unpack=pad2(lambda t: t.unpack, w_max, l_max),
        unpack_valid=pad2(lambda t: t.unpack_valid, w_max, l_max),
        beam_shapes=[tuple(t.unpack.shape) for t in trees],
    )
