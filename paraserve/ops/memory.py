"""Large CPU buffers on transparent huge pages.

The KV cache is read in 16-token blocks that sit anywhere in it, so a decode step at batch 64
touches thousands of scattered 4 KiB pages and pays a TLB miss on most of them. Kernels that
only hand out huge pages on request (transparent_hugepage=madvise, the common default) back a
region advised MADV_HUGEPAGE with 2 MiB pages when it is first touched: ~10% faster paged
attention over a large cache here. Where that is not available the buffer is plain memory.
"""
from __future__ import annotations

import ctypes
import math
import sys
from typing import Optional

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros(shape), contiguous; on Linux CPU, sizes of 2 MiB and more are advised onto
    huge pages before their first touch (the zero fill)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or _LIBC is None or nbytes < _HUGE:
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = torch.empty(nbytes + _HUGE, dtype=torch.uint8)  # untouched: the allocator mmaps it
    offset = (-buf.data_ptr()) % _HUGE
    _LIBC.madvise(ctypes.c_void_p(buf.data_ptr() + offset), ctypes.c_size_t(nbytes // _HUGE * _HUGE),
                  _MADV_HUGEPAGE)  # a refusal (no THP) leaves ordinary pages: nothing to handle
    out = buf[offset:offset + nbytes].view(dtype).view(shape)
    return out.zero_()
