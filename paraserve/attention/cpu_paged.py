"""The CPU backend: decodes attend straight from the paged cache through a compiled kernel.

The reference gathers each decode's K/V rows into a contiguous copy and then runs SDPA, reading
the cache twice; csrc/paged_attention.cpp walks the block tables once with an online softmax.
Prefill chunks and trees keep the reference's path. The kernel is compiled on first use (torch's
extension cache keeps it); when it cannot be built, one warning is logged and this backend
behaves exactly like the reference.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from paraserve.attention.backend import AttentionMetadata
from paraserve.attention.torch_ref import TorchAttentionBackend

logger = logging.getLogger("paraserve")

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags. -march=native binaries are only safe on the CPU
    that built them, and torch keys its cache on the sources and flags alone: the tag in the
    extension name keeps machines that share a home directory from loading each other's."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@functools.cache
def load_kernel() -> Optional[ModuleType]:
    """The compiled extension, or None (after one warning) when it cannot be built here."""
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: an unactivated venv's pip wheel
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        logger.info("compiling the CPU paged attention kernel (once per machine, ~25 s; "
                    "later runs load it from torch's extension cache)")
        t0 = time.perf_counter()
        module = cpp_extension.load(name=f"paraserve_paged_attention_{_cpu_tag()}", sources=[str(_SOURCE)],
                                    extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"])
        logger.info("CPU paged attention kernel ready in %.1f s", time.perf_counter() - t0)
        return module
    except Exception as e:  # no compiler, no ninja, no source file, a build error: all mean fall back
        logger.warning("cannot build the CPU paged attention kernel, using the torch reference "
                       "attention instead: %s", (str(e).strip() or repr(e)).splitlines()[0])
        logger.debug("CPU paged attention build failure", exc_info=True)
        return None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], k/v_cache [num_blocks, block_size, KVH, D], block_tables [B, max_blocks] and
    seq_lens [B] int64 -> [B, H, D]. float32 or bfloat16; head_dim a multiple of the kernel's
    HEAD_DIM_MULTIPLE (its SIMD width: 16 under AVX-512, 8 under AVX, else 4). Raises if the kernel
    cannot be built."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the CPU paged attention kernel is not available on this machine")
    return kernel.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def _decode_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
        kernel = load_kernel()
        if (kernel is None or q.device.type != "cpu" or q.dtype not in _DTYPES
                or q.shape[-1] % kernel.HEAD_DIM_MULTIPLE):
            return super()._decode_attention(q, kv_cache, meta, scale)
        tables = meta.scratch.get("cpu_decode_tables")  # the same for every layer of the step
        if tables is None:
            tables = meta.scratch["cpu_decode_tables"] = meta.block_tables[meta.decode_reqs]  # [Bd, max_blocks]
        return kernel.paged_decode_attention(q, kv_cache[0], kv_cache[1], tables,
                                             meta.decode_seq_lens, scale)  # [Bd, H, D]
