"""Per-request block tables over the block pool, and prefix-cache lookups by hash chain."""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from typing import Optional

from paraserve.core.block_pool import BlockHash, BlockPool, KVBlock
from paraserve.core.request import Request


def hash_block(parent: Optional[BlockHash], token_ids: list[int]) -> BlockHash:
    """Content hash of a full block chained to its parent: equal hashes mean equal prefixes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks. At least one token is always left to compute,
        since the last position's logits are needed to sample."""
        if not self.enable_caching or request.params.prompt_logprobs is not None:
            return [], 0
        hashes = self._hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            found.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(found) * self.block_size
        return found, len(found) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Optional[list[KVBlock]] = None) -> Optional[list[int]]:
        """Blocks for `num_new_tokens` more tokens; None (and no change) when they do not fit."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.req_id, [])
        num_computed = request.num_computed_tokens or len(computed_blocks) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - len(blocks) - len(computed_blocks)
        reusable = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # those leave the free queue
        if need > self.pool.num_free_blocks - reusable:
            if not blocks:
                del self.req_blocks[request.req_id]
            return None
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new = self.pool.allocate(max(need, 0))
        blocks.extend(new)
        return [b.block_id for b in computed_blocks + new]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(request.req_id, [])
        hashes = self._hashes(request, num_computed_tokens)
        for block, h in zip(blocks, hashes):
            if block.block_hash is None:
                self.pool.cache(block, h)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Release the blocks past the first num_tokens tokens: the slots of rejected drafts.
        They hold no verified token, so none of them is in the prefix cache."""
        blocks = self.req_blocks.get(request.req_id, [])
        keep = self.blocks_needed(num_tokens)
        if len(blocks) > keep:
            self.pool.free(list(reversed(blocks[keep:])))
            del blocks[keep:]

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.req_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_hashes.pop(request.req_id, None)

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, [])]

    def _hashes(self, request: Request, num_tokens: int) -> list[BlockHash]:
        """Hashes of the full blocks among the first num_tokens tokens, extended incrementally."""
        hashes = self.req_hashes.setdefault(request.req_id, [])
        num_full = num_tokens // self.block_size
        if len(hashes) < num_full:
            tokens = request.all_token_ids
            bs = self.block_size
            for i in range(len(hashes), num_full):
                hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes[:num_full]

    def check_integrity(self, live_req_ids: Optional[set[str]] = None) -> None:
        """Ref counts equal the number of block tables holding each block; with no live requests,
        every block is free (possibly still holding a cached prefix)."""
        self.pool.check_integrity()
        refs = Counter(b.block_id for blocks in self.req_blocks.values() for b in blocks)
        for block in self.pool.blocks:
            if block.ref_cnt != refs.get(block.block_id, 0):
                raise AssertionError(f"{block}: held by {refs.get(block.block_id, 0)} requests")
        if live_req_ids is not None and set(self.req_blocks) - live_req_ids:
            raise AssertionError(f"blocks leaked by {sorted(set(self.req_blocks) - live_req_ids)}")
