"""The gated activation of SiLU MLPs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from paraserve.ops import cpu


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) -> silu(gate) * up [..., I]; one fused pass on CPU."""
    if gate_up.dim() == 2 and cpu.applies(gate_up):
        return cpu.kernels().silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
