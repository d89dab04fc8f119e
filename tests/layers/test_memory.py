"""Huge-page buffers behave as torch.zeros: shape, dtype, zeroed, contiguous, writable, alive."""
import gc

import torch

from paraserve.ops import memory


def test_zeros_matches_torch_zeros_small_and_large():
    for shape, dtype in [((3, 5), torch.float32), ((2, 300, 16, 3, 64), torch.bfloat16)]:
        t = memory.zeros(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert not t.any()
        t.fill_(1)
        assert t.sum().item() == t.numel()


def test_the_buffer_outlives_the_allocation_call():
    t = memory.zeros((4 << 20,), torch.uint8)  # 4 MiB: the huge-page path on Linux
    gc.collect()
    t[-1] = 7
    assert t[-1].item() == 7 and t[:-1].sum().item() == 0
