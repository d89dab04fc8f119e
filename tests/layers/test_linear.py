"""Weight loaders slice correctly, and the packed bf16 CPU path computes what F.linear does."""
import pytest
import torch
import torch.nn.functional as F

from paraserve.distributed.parallel_state import init_single_process
from paraserve.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                     pack_weight, packed_linear)

init_single_process()


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("k", [80, 64])  # 64: AMX tiles where the CPU has them; 80: oneDNN
def test_packed_bf16_linear_equals_f_linear(rows, k):
    torch.manual_seed(0)
    w = torch.randn(96, k, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("oneDNN is not available")
    torch.testing.assert_close(packed_linear(x, w, packed, b).float(), F.linear(x, w, b).float(),
                               atol=2e-2, rtol=2e-2)
    assert pack_weight(w.float()) is None  # float32 keeps the plain path


def test_stacked_loaders_place_each_shard():
    torch.manual_seed(0)
    qkv = QKVParallelLinear(32, 8, num_heads=4, num_kv_heads=2, bias=True)
    q, k, v = torch.randn(32, 32), torch.randn(16, 32), torch.randn(16, 32)
    for shard, w in (("q", q), ("k", k), ("v", v)):
        qkv.weight_loader(qkv.weight, w, shard)
    torch.testing.assert_close(qkv.weight.data, torch.cat([q, k, v]))
    gu = MergedColumnParallelLinear(32, [48, 48])
    g, u = torch.randn(48, 32), torch.randn(48, 32)
    gu.weight_loader(gu.weight, g, 0)
    gu.weight_loader(gu.weight, u, 1)
    x = torch.randn(3, 32)
    torch.testing.assert_close(gu(x), torch.cat([x @ g.t(), x @ u.t()], dim=-1))
    row = RowParallelLinear(48, 32, bias=True)
    w, b = torch.randn(32, 48), torch.randn(32)
    row.weight_loader(row.weight, w)
    row.weight_loader(row.bias, b)
    torch.testing.assert_close(row(torch.ones(2, 48)), torch.ones(2, 48) @ w.t() + b)
