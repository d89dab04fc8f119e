"""ModelRunner._move_kv: the accepted path's K/V moved into place, one copy at a time for a few
pairs or gathered at once for many, both as if every source were read before any write."""
from types import SimpleNamespace

import pytest
import torch

from paraserve.worker.model_runner import ModelRunner


def reference(cache: torch.Tensor, src: list[int], dst: list[int]) -> torch.Tensor:
    flat = cache.clone().view(*cache.shape[:2], -1, *cache.shape[-2:])
    rows = [flat[:, :, s].clone() for s in src]  # every source read first
    for d, row in zip(dst, rows):
        flat[:, :, d] = row
    return flat.view_as(cache)


@pytest.mark.parametrize("pairs", [
    ([], []),
    ([2, 3], [1, 2]),  # a chain: depth 1 takes node 2, then depth 2 overwrites slot 2 with node 3
    ([5, 7, 8], [1, 2, 3]),
    ([2, 3, 4, 6, 9], [1, 2, 3, 4, 5]),  # more than a few pairs: the batched copy
    ([18, 19, 21, 34, 35], [17, 18, 19, 33, 34]),  # two requests' paths, across blocks
])
def test_move_kv_matches_reading_every_source_first(pairs):
    src, dst = pairs
    cache = torch.randn(3, 2, 4, 16, 2, 8)  # [layers, 2, blocks, block_size, KVH, D]
    runner = SimpleNamespace(kv_cache=cache.clone(), device=torch.device("cpu"))
    ModelRunner._move_kv(runner, src, dst)
    assert torch.equal(runner.kv_cache, reference(cache, src, dst))
