"""--dtype auto on CPU: decided by the CPU's bf16 support, the same on every start."""
import pytest
import torch

from paraserve.ops import cpu
from paraserve.worker.worker import resolve_dtype


@pytest.mark.parametrize("flags,want", [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile", torch.bfloat16),  # Zen 4 / Sapphire Rapids
    ("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile", torch.bfloat16),
    ("Features\t: fp asimd bf16 i8mm", torch.bfloat16),  # Arm with the BF16 extension
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw", torch.float32),  # bf16 would be emulated
    ("Features\t: fp asimd", torch.float32),
])
def test_auto_follows_native_bf16(monkeypatch, flags, want):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    picks = {resolve_dtype("auto", torch.device("cpu")) for _ in range(3)}
    assert picks == {want}
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32  # explicit wins


def test_this_machine_gets_the_same_dtype_every_time():
    native = cpu.native_bf16()
    assert resolve_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else torch.float32)
