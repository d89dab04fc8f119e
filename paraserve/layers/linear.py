"""Linear layers that know their tensor-parallel shard and load their own slice of a weight.

Column-parallel layers split output features across TP ranks, row-parallel layers split
input features and all-reduce their output. At tp=1 every shard is the whole weight.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from paraserve.config import ConfigError
from paraserve.distributed import comm
from paraserve.distributed.parallel_state import get_tp_group
from paraserve.layers.weight_utils import Loaded, materialize, narrow
from paraserve.ops import cpu


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ConfigError(f"{what} ({n}) is not divisible by the tensor parallel size ({d})")
    return n // d


def split_heads(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int, int]:
    """(query heads, KV heads, KV replicas) per TP rank. KV heads are split when tp divides
    them and replicated when tp is a multiple of them (each rank keeps one)."""
    kv_ok = num_kv_heads % tp == 0 or tp % num_kv_heads == 0
    if num_heads % tp or not kv_ok:
        valid = [d for d in range(1, num_heads + 1)
                 if num_heads % d == 0 and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
        raise ConfigError(f"tensor parallel size {tp} does not fit the model's {num_heads} attention "
                          f"heads and {num_kv_heads} KV heads; use one of {valid}")
    if num_kv_heads >= tp:
        return num_heads // tp, num_kv_heads // tp, 1
    return num_heads // tp, 1, tp // num_kv_heads


class Packed(NamedTuple):
    """A bf16 CPU weight prepacked for its GEMM: `panels` True is amx_pack_weight's panel layout
    (every M runs on panel_linear: AMX tiles or AVX-512 BF16 vectors), False oneDNN's blocked
    layout (larger M only)."""
    panels: bool
    data: torch.Tensor


def pack_weight(weight: torch.Tensor) -> Optional[Packed]:
    """bf16 on CPU: the weight prepacked once. Where the CPU has AMX or AVX-512 BF16 (and N, K are
    multiples of 32) the panel layout, used for every M: a few rows cost what one does (the weight
    stream is the bound: up to ~6 on AVX-512 BF16, 10 costing ~20% more), each row's result is
    independent of the batch around it, and large M runs at oneDNN's speed or better. Otherwise
    oneDNN's blocked layout (what inductor's freezing does), ~1.4x faster than the plain layout
    where M is large. None where neither applies."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return None
    if panels_fit(weight):
        return Packed(True, cpu.kernels().amx_pack_weight(weight.data))
    if torch.backends.mkldnn.is_available():
        return Packed(False, torch.ops.mkldnn._reorder_linear_weight(weight.data, 64))
    return None


def panels_fit(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return n % 32 == 0 and k % 32 == 0 and cpu.panels_available()


def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: Optional[Packed],
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias). Panel-packed weights take panel_linear for every M. Else a
    decode step's few rows stream the plain weight through the small-M CPU kernel (memory-bound;
    oneDNN reads it at half the bandwidth) and larger M uses oneDNN's packed weight."""
    if packed is not None and x.dim() == 2:
        if packed.panels and x.dtype == torch.bfloat16:
            return cpu.kernels().panel_linear(x, packed.data, bias)
    if x.dim() == 2 and x.shape[0] <= cpu.SMALL_M_MAX and cpu.applies(x, weight):
        return cpu.kernels().small_m_linear(x, weight, bias)
    if packed is not None and not packed.panels and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, packed.data, bias, "none", [], "")
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def process_weights_after_loading(self) -> None:
        self.packed = pack_weight(self.weight)

    def _matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return packed_linear(x, self.weight, getattr(self, "packed", None), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        param.data.copy_(materialize(loaded))


class ReplicatedLinear(LinearBase):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 gather_output: bool = False) -> None:
        tp = get_tp_group()
        super().__init__(in_features, _divide(out_features, tp.size, "output features"), bias)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        return comm.all_gather_last_dim(y, self.tp) if self.gather_output else y

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        n = param.shape[0]
        param.data.copy_(narrow(loaded, 0, self.tp.rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        tp = get_tp_group().size
        self.output_sizes = [_divide(s, tp, "output features") for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"{type(self).__name__} loads one output at a time; shard_id must "
                             f"be its index, got {shard_id!r}")
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        param.data.narrow(0, offset, size).copy_(narrow(loaded, 0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one matmul; KV heads are replicated when tp exceeds their number."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp = get_tp_group().size
        self.num_heads, self.num_kv_heads, self.kv_replicas = split_heads(num_heads, num_kv_heads, tp)
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp.rank
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp.rank // self.kv_replicas  # replicas share a KV head
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(narrow(loaded, 0, rank * size, size))


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = get_tp_group()
        super().__init__(_divide(in_features, tp.size, "input features"), out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, None)
        y = comm.all_reduce(y, self.tp)
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        if param.dim() == 1:  # bias: added once, after the all-reduce
            param.data.copy_(materialize(loaded))
            return
        n = param.shape[1]
        param.data.copy_(narrow(loaded, 1, self.tp.rank * n, n))
