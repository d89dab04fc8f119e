"""Draft beams -> one prefix tree per request, verified by the base model in one forward.

Root convention: node 0 is the root, carrying the last verified token (sampled at the previous
step; its KV is not in the cache yet). A tree of N nodes is fed to the model as N new tokens,
node i at position `num_computed_tokens + depths[i]`, and gives N logit rows: row i predicts
the token after node i (row 0 the first draft token, the row at the last accepted node the
bonus token). Draft nodes 1..N-1 are in topological order (a parent's index is smaller than
its children's), so a node's ancestors sit left of it and a path's nodes ascend by depth.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch


@dataclass(eq=False)
class DraftTree:
    """Plain lists are the tree; the tensor views (token_ids ... unpack_valid) are built on first
    use. The engine's greedy path walks the lists only: at batch 1 a step's ~10 tensors from
    lists, and back, cost more than the walk itself."""
    tokens: list[int]  # [N]; [0] is the root
    parent: list[int]  # [N]; parent[0] = 0: the root is its own parent
    depth: list[int]  # [N]; position offset from the root (root 0)
    beam_nodes: list[list[int]]  # [W] beam w's nodes, depth 1 first (may be empty)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def beam_length(self) -> int:
        return max((len(b) for b in self.beam_nodes), default=0)

    @classmethod
    def from_beams(cls, root_token: int, beams: Sequence[Sequence[int]]) -> "DraftTree":
        """Merge W beams (token lists, possibly of different lengths, possibly empty) into a
        prefix tree: a shared prefix is stored, and verified, once."""
        tokens, parents, depths = [root_token], [0], [0]
        child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        beam_nodes = []
        for beam in beams:
            node, path = 0, []
            for tok in beam:
                key = (node, int(tok))
                node = child.get(key, 0)
                if not node:  # nodes are created in beam order: parents come first
                    node = child[key] = len(tokens)
                    tokens.append(key[1])
                    parents.append(key[0])
                    depths.append(len(path) + 1)
                path.append(node)
            beam_nodes.append(path)
        return cls(tokens, parents, depths, beam_nodes)

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes (n >= 1), e.g. when the step's token budget has no room for all:
        a tree again, since a parent precedes its children. Beams end where they leave it."""
        if n >= self.num_nodes:
            return self
        cut = []
        for path in self.beam_nodes:  # node ids grow along a beam: a prefix stays
            k = 0
            while k < len(path) and path[k] < n:
                k += 1
            cut.append(path[:k])
        return DraftTree(self.tokens[:n], self.parent[:n], self.depth[:n], cut)

    def mask_rows(self) -> list[list[bool]]:
        """attn_mask as lists: row i is True at i and its ancestors."""
        n = self.num_nodes
        rows = [[True] + [False] * (n - 1)]
        for i in range(1, n):  # a node sees what its parent sees, and itself
            rows.append(rows[self.parent[i]].copy())
            rows[i][i] = True
        return rows

    @cached_property
    def token_ids(self) -> torch.Tensor:  # [N] int64
        return torch.tensor(self.tokens, dtype=torch.int64)

    @cached_property
    def parents(self) -> torch.Tensor:  # [N] int64
        return torch.tensor(self.parent, dtype=torch.int64)

    @cached_property
    def depths(self) -> torch.Tensor:  # [N] int64
        return torch.tensor(self.depth, dtype=torch.int64)

    @cached_property
    def attn_mask(self) -> torch.Tensor:  # [N, N] bool; [i, j]: j is i or an ancestor of i
        return torch.tensor(self.mask_rows(), dtype=torch.bool)

    @cached_property
    def unpack(self) -> torch.Tensor:
        """[W, L] int64: beam w's token l (depth l + 1) is node unpack[w, l]; 0 (the root) where
        unpack_valid is False (beams may be shorter than L)."""
        L = self.beam_length
        return torch.tensor([p + [0] * (L - len(p)) for p in self.beam_nodes],
                            dtype=torch.int64).view(len(self.beam_nodes), L)

    @cached_property
    def unpack_valid(self) -> torch.Tensor:  # [W, L] bool
        lengths = torch.tensor([len(p) for p in self.beam_nodes], dtype=torch.int64)
        return torch.arange(self.beam_length).unsqueeze(0) < lengths.unsqueeze(1)

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


@dataclass(eq=False)
class PackedTrees:
    """Trees of B requests: flat for the model forward, padded for verification. The padded
    tensors are built on first use (greedy verification walks the trees' lists instead)."""
    trees: list[DraftTree]
    query_start_loc: list[int]  # [B + 1] first flat row of each tree
    device: Optional[torch.device] = None

    # padded to N = max nodes, W = max beams, L = max beam length; padding nodes are
    # unreachable: no valid unpack entry points at them and their mask rows/columns are False

    @property
    def num_nodes(self) -> list[int]:
        return [t.num_nodes for t in self.trees]

    @property
    def beam_shapes(self) -> list[tuple[int, int]]:  # [B] each request's own (W, L), before padding
        return [(len(t.beam_nodes), t.beam_length) for t in self.trees]

    @property
    def beam_length(self) -> int:  # L
        return max(t.beam_length for t in self.trees)

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _padded(self, get) -> torch.Tensor:  # [B, N] from each tree's list
        n = max(self.num_nodes)
        return self._tensor([get(t) + [0] * (n - t.num_nodes) for t in self.trees])

    @cached_property
    def token_ids(self) -> torch.Tensor:  # [T] all nodes, request after request: the model's input
        return self._tensor([x for t in self.trees for x in t.tokens])

    @cached_property
    def depths(self) -> torch.Tensor:  # [T] position offsets from each request's root
        return self._tensor([x for t in self.trees for x in t.depth])

    @cached_property
    def node_tokens(self) -> torch.Tensor:  # [B, N] int64
        return self._padded(lambda t: t.tokens)

    @cached_property
    def node_parents(self) -> torch.Tensor:  # [B, N] int64
        return self._padded(lambda t: t.parent)

    @cached_property
    def node_depths(self) -> torch.Tensor:  # [B, N] int64
        return self._padded(lambda t: t.depth)

    @cached_property
    def node_index(self) -> torch.Tensor:  # [B, N] int64 flat row of each node; padding -> the tree's root
        n = max(self.num_nodes)
        return self._tensor([[start + (i if i < t.num_nodes else 0) for i in range(n)]
                             for start, t in zip(self.query_start_loc, self.trees)])

    @cached_property
    def attn_mask(self) -> torch.Tensor:  # [B, N, N] bool
        n = max(self.num_nodes)
        pad = [False] * n
        return self._tensor([[r + [False] * (n - len(r)) for r in t.mask_rows()] + [pad] * (n - t.num_nodes)
                             for t in self.trees], torch.bool)

    @cached_property
    def unpack(self) -> torch.Tensor:  # [B, W, L] int64
        W, L = max(len(t.beam_nodes) for t in self.trees), self.beam_length
        return self._tensor([[p + [0] * (L - len(p)) for p in t.beam_nodes] + [[0] * L] * (W - len(t.beam_nodes))
                             for t in self.trees]).view(len(self.trees), W, L)

    @cached_property
    def unpack_valid(self) -> torch.Tensor:  # [B, W, L] bool
        W, L = max(len(t.beam_nodes) for t in self.trees), self.beam_length
        return self._tensor([[[l < len(p) for l in range(L)] for p in t.beam_nodes] + [[False] * L] * (W - len(t.beam_nodes))
                             for t in self.trees], torch.bool).view(len(self.trees), W, L)

    def request_masks(self) -> dict[int, torch.Tensor]:
        """Request index -> its [n, n] mask: AttentionMetadata.custom_masks."""
        return {b: t.attn_mask if self.device is None else t.attn_mask.to(self.device)
                for b, t in enumerate(self.trees)}

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """[T, ...] per flat node (e.g. logits) -> [B, N, ...] per padded node."""
        return flat[self.node_index]


def pack_trees(trees: Sequence[DraftTree], device: Optional[torch.device] = None) -> PackedTrees:
    if not trees:
        raise ValueError("pack_trees needs at least one tree")
    starts = [0]
    for t in trees:
        starts.append(starts[-1] + t.num_nodes)
    return PackedTrees(list(trees), starts, device)
