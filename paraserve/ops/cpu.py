"""The CPU kernels of csrc/, compiled once per machine on first use (torch's extension cache keeps
the build), and small predicates saying when each applies. When the extension cannot be built
(no compiler, a build error), `kernels()` returns None after one warning and every caller keeps
its plain torch path, so nothing depends on a compiler being present.
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

logger = logging.getLogger("paraserve")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["bindings.cpp", "paged_attention.cpp", "paged_attention_amx.cpp", "small_gemm.cpp", "amx_gemm.cpp", "int8_gemm.cpp", "bf16_gemm.cpp", "fused.cpp", "decoder_stack.cpp", "draft_head.cpp"]
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
DTYPES = (torch.float32, torch.bfloat16)
# Up to this many rows a linear layer without a panel-packed weight uses small_m_linear, whose rows
# are computed alike whatever M is: a draft tree verified in one step (up to 1 + width x length
# rows) then gets the same numbers as decoding its tokens one by one, so bf16 greedy output does
# not change with speculation. Below ~8 rows it is also ~2x faster than oneDNN; near 32 the two
# are on par. Panel-packed weights (panel_linear) are row-invariant at every M.
SMALL_M_MAX = 32


@functools.cache
def cpu_flags() -> str:
    """The CPU's feature flags line from /proc/cpuinfo (x86 "flags", Arm "Features"), or the
    machine and processor names where there is none."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.machine() + platform.processor()


def native_bf16() -> bool:
    """The CPU computes in bf16 natively: AVX-512 BF16 or AMX (x86), the BF16 extension (Arm).
    Without it bf16 matrix products are emulated and float32 is faster."""
    flags = set(cpu_flags().split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _build_tag() -> str:
    """A short hash of this CPU's feature flags. -march=native binaries are only safe on the CPU
    that built them, and torch keys its cache on the sources and flags alone: the tag in the
    extension name keeps machines that share a home directory apart (torch itself rebuilds when
    the sources change)."""
    return hashlib.sha1(cpu_flags().encode()).hexdigest()[:10]


@functools.cache
def kernels() -> Optional[ModuleType]:
    """The compiled extension, or None (after one warning) when it cannot be built here."""
    if os.environ.get("PARASERVE_NO_CPU_KERNELS"):
        return None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: an unactivated venv's pip wheel
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        t0 = time.perf_counter()
        logger.info("loading the CPU kernels (compiled once per machine, ~1 min; later runs load "
                    "them from torch's extension cache)")
        module = cpp_extension.load(name=f"paraserve_cpu_{_build_tag()}",
                                    sources=[str(_CSRC / s) for s in _SOURCES],
                                    extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"])
        logger.info("CPU kernels ready in %.1f s", time.perf_counter() - t0)
        return module
    except Exception as e:  # no compiler, no ninja, no source file, a build error: all mean fall back
        logger.warning("cannot build the CPU kernels, using plain torch instead (slower): %s",
                       (str(e).strip() or repr(e)).splitlines()[0])
        logger.debug("CPU kernel build failure", exc_info=True)
        return None


@functools.cache
def amx_available() -> bool:
    """The kernels are built with AMX tiles and this CPU and kernel grant them (amx_gemm.cpp)."""
    k = kernels()
    return k is not None and k.amx_available()


@functools.cache
def panels_available() -> bool:
    """panel_linear runs here: AMX tiles (amx_gemm.cpp) or AVX-512 BF16 vectors (bf16_gemm.cpp)."""
    k = kernels()
    return k is not None and (k.amx_available() or k.avx512_bf16_available())


@functools.cache
def int8_available() -> bool:
    """int8_linear runs here (the drafter's drafter_int8): AMX tiles or AVX-512 VNNI (int8_gemm.cpp)."""
    k = kernels()
    return k is not None and k.int8_available()


def applies(*tensors: torch.Tensor) -> bool:
    """True when the kernels are built and every tensor is a CPU float32/bfloat16 tensor. Called
    several times per layer on the decode path, so written for speed (~0.3 us, a tenth of a
    generator over the tensors)."""
    for t in tensors:
        if not t.is_cpu or t.dtype not in DTYPES:
            return False
    return kernels() is not None
