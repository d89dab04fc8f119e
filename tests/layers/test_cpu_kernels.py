"""The fused CPU kernels of paraserve/ops against the plain torch code they replace: each layer is
run twice, once with the kernels and once with them switched off (cpu.applies -> False)."""
import pytest
import torch
import torch.nn.functional as F

from paraserve.distributed import parallel_state
from paraserve.layers import activation, layernorm, linear, rotary, sampler
from paraserve.ops import cpu

DTYPES = [torch.float32, torch.bfloat16]
# float32 kernels round as torch does; reductions may sum in another order (a few ulps)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if cpu.kernels() is None:
        pytest.skip("the CPU kernels cannot be compiled here (see the log warning)")


def reference(monkeypatch, fn, *args):
    """fn(*args) with the kernels switched off."""
    with monkeypatch.context() as m:
        m.setattr(cpu, "applies", lambda *tensors: False)
        return fn(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n, bias", [(1, 576, 960, False), (3, 577, 35, True), (8, 1536, 576, False),
                                           (13, 64, 1000, True), (16, 40, 7, False)])
def test_small_m_linear_matches_linear(dtype, m, k, n, bias):
    torch.manual_seed(m * n)
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    got = cpu.kernels().small_m_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = ref.abs().max()
    assert got.dtype == dtype and got.shape == (m, n)
    # bf16: products are exact, the sum is float32, the result is rounded once (2^-8 relative)
    assert ((got.double() - ref).abs().max() / scale) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_small_m_linear_reads_a_strided_x_and_rejects_mismatches():
    x = torch.randn(4, 64)[:, :32]
    w = torch.randn(10, 32)
    torch.testing.assert_close(cpu.kernels().small_m_linear(x, w, None), F.linear(x, w))
    with pytest.raises(RuntimeError, match="expected x"):
        cpu.kernels().small_m_linear(torch.randn(2, 5), w, None)


amx = pytest.mark.skipif(not cpu.amx_available(), reason="no AMX tiles on this CPU")
# the two kernels that read amx_pack_weight's panel layout, each where this CPU runs it
PANEL_KERNELS = [
    pytest.param("amx_linear", marks=amx),
    pytest.param("bf16_panel_linear", marks=pytest.mark.skipif(
        cpu.kernels() is None or not cpu.kernels().avx512_bf16_available(), reason="no AVX-512 BF16 in this build")),
]


@pytest.mark.parametrize("kernel", PANEL_KERNELS)
@pytest.mark.parametrize("m, k, n, bias", [(1, 576, 960, False), (5, 64, 96, True), (12, 1536, 576, True),
                                           (17, 32, 64, False), (33, 576, 3072, True), (100, 96, 64, True)])
def test_panel_linear_matches_linear_and_rows_do_not_depend_on_the_batch(kernel, m, k, n, bias):
    torch.manual_seed(m * n)
    run = getattr(cpu.kernels(), kernel)
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    packed = cpu.kernels().amx_pack_weight(w)
    got = run(x, packed, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 8e-3  # float32 sums, one bf16 rounding
    # each row alone, and the rows in another batch, give the same bits: a draft tree verified in
    # one step matches decoding its tokens one by one
    for i in {0, m // 2, m - 1}:
        assert torch.equal(run(x[i:i + 1].clone(), packed, b)[0], got[i])
    assert torch.equal(run(x.flip(0), packed, b), got.flip(0))


@pytest.mark.parametrize("kernel", PANEL_KERNELS)
def test_panel_linear_reads_a_strided_x_and_rejects_what_it_cannot_pack(kernel):
    run = getattr(cpu.kernels(), kernel)
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    for x in (torch.randn(3, 64, dtype=torch.bfloat16)[:, :32], torch.randn(3, 65, dtype=torch.bfloat16)[:, 1:33]):
        got = run(x, cpu.kernels().amx_pack_weight(w), None)
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), atol=0.1, rtol=1e-2)
    with pytest.raises(RuntimeError, match="N % 32"):
        cpu.kernels().amx_pack_weight(torch.randn(40, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="columns"):
        run(torch.randn(2, 64, dtype=torch.bfloat16), cpu.kernels().amx_pack_weight(w), None)


def int8_rows(t: torch.Tensor, by_inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 in float32 as int8_gemm.cpp rounds it: values and scales (weights
    are divided by their scale, activations multiplied by 127 / max)."""
    amax = t.float().abs().amax(1, keepdim=True)
    q = t.float() * (127 / amax) if by_inverse else t.float() / (amax / 127)
    return q.round().clamp(-127, 127).double(), (amax / 127).double()


vnni = pytest.mark.skipif(cpu.kernels() is None or not cpu.kernels().vnni_int8_available(),
                          reason="no AVX-512 VNNI in this build")
INT8_KERNELS = [pytest.param("amx_int8_linear", marks=amx), pytest.param("vnni_int8_linear", marks=vnni)]


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("m, k, n, bias", [(1, 576, 8192, False), (4, 64, 96, True), (16, 1152, 576, True),
                                           (21, 128, 64, True)])
def test_int8_linear_is_the_product_of_the_row_quantized_operands(kernel, m, k, n, bias):
    torch.manual_seed(m + n)
    run = getattr(cpu.kernels(), kernel)
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    x[0, 3] = 9.0  # an outlier sets its row's scale
    x[-1] = x[-1].abs()  # a row of one sign: the VNNI kernel's offset (128 * the row's sum) is large
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    packed, scale = cpu.kernels().amx_pack_int8(w)
    got = run(x, packed, scale, b)
    (xq, sx), (wq, sw) = int8_rows(x, by_inverse=True), int8_rows(w, by_inverse=False)
    # the int32 sums are exact: what remains is float32 scaling and one bf16 rounding
    ref = (xq @ wq.T) * sx * sw.T + (0 if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-3 * ref.abs().max()).all()
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert (got.double() - exact).norm() / exact.norm() < 0.03  # what int8 costs
    for i in {0, m // 2, m - 1}:  # exact int32 sums: a row's bits do not depend on the batch
        assert torch.equal(run(x[i:i + 1].clone(), packed, scale, b)[0], got[i])
    with pytest.raises(RuntimeError, match="K % 64"):
        cpu.kernels().amx_pack_int8(torch.randn(64, 32, dtype=torch.bfloat16))


@amx
@vnni
def test_the_int8_kernels_give_the_same_bits():
    torch.manual_seed(0)
    x, w = torch.randn(13, 1152, dtype=torch.bfloat16), torch.randn(576, 1152, dtype=torch.bfloat16)
    b = torch.randn(576, dtype=torch.bfloat16)
    packed, scale = cpu.kernels().amx_pack_int8(w)
    assert torch.equal(cpu.kernels().amx_int8_linear(x, packed, scale, b),
                       cpu.kernels().vnni_int8_linear(x, packed, scale, b))


@pytest.mark.skipif(not cpu.panels_available(), reason="neither AMX nor AVX-512 BF16 on this CPU")
def test_linear_layer_on_panels_gives_each_row_the_same_numbers_at_every_batch_size():
    parallel_state.init_single_process()
    layer = linear.ReplicatedLinear(64, 96, bias=True).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight), torch.nn.init.normal_(layer.bias)
    layer.process_weights_after_loading()
    assert layer.packed.panels
    x = torch.randn(70, 64, dtype=torch.bfloat16)
    full = layer(x)
    for rows in (1, 7, cpu.SMALL_M_MAX, cpu.SMALL_M_MAX + 1):
        assert torch.equal(layer(x[:rows]), full[:rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_layer_uses_the_kernel_for_few_rows(monkeypatch, dtype):
    parallel_state.init_single_process()
    layer = linear.ReplicatedLinear(96, 80, bias=True).to(dtype)
    torch.nn.init.normal_(layer.weight), torch.nn.init.normal_(layer.bias)
    layer.process_weights_after_loading()
    for rows in (1, cpu.SMALL_M_MAX, cpu.SMALL_M_MAX + 1):
        x = torch.randn(rows, 96, dtype=dtype)
        torch.testing.assert_close(layer(x), reference(monkeypatch, layer, x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 37, 600])  # 600: enough rows of 64 to split over threads
def test_rms_norm_matches_torch_and_adds_the_residual_in_place(monkeypatch, dtype, rows):
    norm = layernorm.RMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(64, dtype=dtype)
    x, residual = torch.randn(rows, 64, dtype=dtype), torch.randn(rows, 64, dtype=dtype)
    ref_out, ref_res = reference(monkeypatch, norm, x, residual.clone())
    res = residual.clone()
    out, res_out = norm(x, res)
    assert res_out is res, "the residual is updated in place"
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(norm(x), reference(monkeypatch, norm, x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_matches_rotary_then_cache_write(dtype):
    class Cfg:
        rope_theta = 10000.0
    rope = rotary.RotaryEmbedding(Cfg(), 32, 256)
    t, h, kvh, d = 7, 4, 2, 32
    qkv = torch.randn(t, (h + 2 * kvh) * d, dtype=dtype)  # q/k/v are strided views, as in the model
    q, k, v = (x.view(t, -1, d) for x in qkv.split([h * d, kvh * d, kvh * d], dim=-1))
    positions = torch.tensor([0, 5, 9, 100, 101, 255, 3])
    slots = torch.tensor([3, 17, 8, 40, 41, 0, 63])
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    cache = torch.zeros(2, 4, 16, kvh, d, dtype=dtype)
    cpu.kernels().rope_and_cache(q, k, v, positions, rope.cos, rope.sin, cache, slots)
    torch.testing.assert_close(q, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(k, ref_k, atol=0, rtol=0)
    flat = cache.view(2, -1, kvh, d)
    torch.testing.assert_close(flat[0, slots], ref_k, atol=0, rtol=0)
    torch.testing.assert_close(flat[1, slots], v, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        cpu.kernels().rope_and_cache(q, k, v, positions, rope.cos, rope.sin, cache, slots + 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(monkeypatch, dtype):
    gate_up = torch.randn(5, 2 * 75, dtype=dtype) * 8  # 75: a tail past the SIMD width
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    torch.testing.assert_close(activation.silu_and_mul(gate_up),
                               reference(monkeypatch, activation.silu_and_mul, gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_takes_the_first_maximum_and_ranks_nan_highest(dtype):
    x = torch.randn(6, 1000, dtype=dtype)
    x[1, 10] = x[1, 20] = 50.0  # a tie: the first wins
    x[2, 999] = 60.0
    x[3, 500] = float("nan")
    x[4] = 0.0
    torch.testing.assert_close(sampler.argmax(x), x.argmax(-1), atol=0, rtol=0)
    assert sampler.argmax(x)[1] == 10 and sampler.argmax(x)[3] == 500 and sampler.argmax(x)[4] == 0
    # the vector passes: rows of all -inf, +inf twice, a NaN or the maximum in the scalar tail
    # (1003 columns: four-vector strides to 960, then single vectors to 992, then the tail)
    y = torch.randn(7, 1003, dtype=dtype)
    y[0] = float("-inf")
    y[1, 7] = y[1, 900] = float("inf")
    y[2, 1001] = float("nan")
    y[3, 1002] = 99.0
    y[4, 16] = y[4, 1000] = 99.0
    y[5, 970] = 99.0  # only in the single-vector stretch
    y[6, 50] = y[6, 33] = y[6, 975] = 99.0  # ties across the accumulators and the stretch
    assert sampler.argmax(y).tolist() == [0, 7, 1001, 1002, 16, 970, 33]


def test_sample_rows_is_the_inverse_cdf_and_never_picks_a_zero():
    # exact binary fractions: running sums are exact, so every boundary is known
    probs = torch.zeros(3, 40)
    probs[0, [3, 17, 18, 39]] = torch.tensor([0.25, 0.5, 0.0, 0.25])
    probs[1, 0] = 2.0  # unnormalised: a single token
    probs[2, 16:32] = 1.0  # one full vector, scanned token by token
    for u, want in [(0.0, [3, 0, 16]), (0.2499, [3, 0, 19]), (0.25, [17, 0, 20]), (0.74, [17, 0, 27]),
                    (0.75, [39, 0, 28]), (0.9999, [39, 0, 31])]:
        got = cpu.kernels().sample_rows(probs, torch.full((3,), u))
        assert got.tolist() == want, u
    # a large random vocabulary: matches the cumsum/searchsorted reference away from boundaries
    torch.manual_seed(0)
    p = torch.rand(8, 49152) ** 8
    u = torch.rand(8)
    cdf = p.double().cumsum(-1)
    ref = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    assert (cpu.kernels().sample_rows(p, u) - ref).abs().max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_rows_matches_torch(dtype):
    """train-drafter's teacher: log(sum(exp)) of each row of the LM head's logits, in float32,
    for rows with a tail past the vector width, large logits, and rows of -inf."""
    torch.manual_seed(0)
    x = (torch.randn(5, 49157) * 6).to(dtype)
    x[1, :100] = 80.0  # far above the rest: the shift keeps exp finite
    x[2] = float("-inf")
    x[3, 7] = 3.0
    x[3, torch.arange(49157) != 7] = float("-inf")
    got = cpu.kernels().logsumexp_rows(x)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got, torch.logsumexp(x.float(), -1), rtol=1e-6, atol=1e-5)
    assert got[2] == float("-inf") and got[3] == 3.0
    with pytest.raises(RuntimeError, match="rows contiguous"):
        cpu.kernels().logsumexp_rows(x.t())
