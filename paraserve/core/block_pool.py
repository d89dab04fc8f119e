"""Fixed-size KV blocks: ref counts, an LRU free queue, and the prefix-cache hash map."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

BlockHash = bytes


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    """Blocks with ref_cnt 0 sit in the free queue, oldest-freed first. A free block may still
    hold a cached prefix: it is evicted (its hash dropped) only when it is handed out again,
    so unreferenced cached blocks are reused in LRU order."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks found by a prefix lookup."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each; callers pass tail blocks first so they are evicted first."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"double free of {block}"
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def lookup(self, block_hash: BlockHash) -> Optional[KVBlock]:
        return self.cached.get(block_hash)

    def cache(self, block: KVBlock, block_hash: BlockHash) -> None:
        if block.block_hash is not None or block_hash in self.cached:
            return  # the same content is already cached in another block: keep that one
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            self._evict(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def check_integrity(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self._free
            if (block.ref_cnt == 0) != in_free:
                raise AssertionError(f"{block}: ref count and free queue disagree")
            if block.block_hash is not None and self.cached.get(block.block_hash) is not block:
                raise AssertionError(f"{block}: hash not in the cache map")
        for h, block in self.cached.items():
            if block.block_hash != h:
                raise AssertionError(f"cache map entry points at {block} with another hash")
