// x [M, K] @ w[N, K]^T with int8 weights and int8 activations, for the drafter's layers
// (draft_head.cpp) only: a beam search reads its ~15 MB of weights once a step, and at a few rows
// that read is most of the cost, so halving the bytes halves the search. Drafts need not be exact
// (verification decides what is emitted); the base model never takes this.
//
// Quantization is symmetric: w row n by scale_w[n] = max|w[n, :]| / 127 (once, at packing), x
// row m by max|x[m, :]| / 127 (each call); out = int32 sum * scale_x[m] * scale_w[n], in bf16.
// The packed layout mirrors amx_gemm.cpp's: panels of 32 output columns, each a run over K of
// two 16-column tiles in the int8 VNNI layout [k / 4][n][k % 4].
//
// Two kernels read it: AMX tiles (TDPBSSD, signed x signed) and, on CPUs without AMX, AVX-512 VNNI
// (VPDPBUSD, AMD Zen 4): a row of a tile is one vector of 16 columns x 4 bytes, as in
// bf16_gemm.cpp. VPDPBUSD multiplies unsigned by signed bytes, so the weight bytes get their sign
// bit flipped in registers (w + 128 as unsigned) and each row's sum loses 128 * sum(x[m, :]).
// The int32 sums are exact either way: both kernels give the same bits.
#include "amx.h"
#include "ops.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

namespace paraserve {

constexpr int64_t kInt8Panel = 32;  // output columns per panel: two tiles of 16
constexpr int64_t kInt8KBlock = 64;  // int8 elements of K per tile row (64 bytes)

namespace {

#if defined(__AVX512F__)
// Row m of x (bf16 [M, K], K % 16 == 0) -> xq[m] int8, its scale sx[m] and its sum qsum[m].
void quantize_rows(const at::BFloat16* x, int64_t M, int64_t K, int8_t* xq, float* sx, int32_t* qsum) {
  auto load16 = [](const at::BFloat16* p) { return (__m512)load(p); };  // vec.h: bf16 -> float32
  for (int64_t m = 0; m < M; ++m) {
    const at::BFloat16* row = x + m * K;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16(row + k)));
    const float amax = _mm512_reduce_max_ps(mx);
    sx[m] = amax > 0 ? amax / 127.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {  // round to nearest even, saturate to [-127, 127]
      const __m512i q = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k), inv)),
                                         _mm512_set1_epi32(-127));
      const __m128i q8 = _mm512_cvtsepi32_epi8(q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + k), q8);
      sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(q8));
    }
    qsum[m] = _mm512_reduce_add_epi32(sum);
  }
}

// out[m, panel columns] = bf16(int32 sums * sx[m] * sw[n] + bias[n]) for `rows` rows of acc.
inline void store_rows(const int32_t* acc, int64_t ld_acc, const float* sx, const float* sw, const at::BFloat16* bias,
                       at::BFloat16* out, int64_t ldo, int64_t rows) {
  const __m512 w0 = _mm512_loadu_ps(sw), w1 = _mm512_loadu_ps(sw + 16);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias) {
    b0 = (__m512)load(bias);
    b1 = (__m512)load(bias + 16);
  }
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 s = _mm512_set1_ps(sx[m]);
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + m * ld_acc)), _mm512_mul_ps(w0, s), b0);
    const __m512 hi =
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + m * ld_acc + 16)), _mm512_mul_ps(w1, s), b1);
    _mm512_storeu_si512(out + m * ldo, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}
#endif

#if defined(PARASERVE_AMX) && defined(__AMX_INT8__)
#define PARASERVE_AMX_INT8 1

constexpr int64_t kTileBytes = 16 * kInt8KBlock;  // one B tile
constexpr int64_t kPrefetchSteps = 4;

// Tiles: 0 = x rows (up to 16), 2, 3 = the panel's two column tiles, 4, 5 = their int32 sums.
void configure(int64_t rows) {
  amx::TileConfig c;
  c.rows[0] = c.rows[4] = c.rows[5] = static_cast<uint8_t>(rows);
  c.colsb[0] = c.colsb[4] = c.colsb[5] = 64;
  c.rows[2] = c.rows[3] = 16;
  c.colsb[2] = c.colsb[3] = 64;
  _tile_loadconfig(&c);
}

void run(const int8_t* xq, const float* sx, const int8_t* wp, const float* sw, const at::BFloat16* bias,
         at::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const int64_t panels = N / kInt8Panel, kb_count = K / kInt8KBlock, panel_bytes = K * kInt8Panel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) int32_t buf[16 * kInt8Panel];
    int64_t configured = -1;
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* w = wp + p * panel_bytes;
      const int8_t* next = wp + std::min(p + 1, panels - 1) * panel_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int64_t rows = std::min<int64_t>(16, M - m0);
        if (rows != configured) {
          configure(rows);
          configured = rows;
        }
        _tile_zero(4);
        _tile_zero(5);
        for (int64_t kb = 0; kb < kb_count; ++kb) {
          const int64_t ahead = kb + kPrefetchSteps;
          const int8_t* pf = ahead < kb_count ? w + ahead * 2 * kTileBytes
                                              : next + std::min(ahead - kb_count, kb_count - 1) * 2 * kTileBytes;
          for (int64_t line = 0; line < 2 * kTileBytes; line += 64) _mm_prefetch(pf + line, _MM_HINT_T0);
          _tile_loadd(0, xq + m0 * K + kb * kInt8KBlock, K);
          _tile_loadd(2, w + kb * 2 * kTileBytes, 64);
          _tile_loadd(3, w + kb * 2 * kTileBytes + kTileBytes, 64);
          _tile_dpbssd(4, 0, 2);
          _tile_dpbssd(5, 0, 3);
        }
        _tile_stored(4, buf, kInt8Panel * 4);
        _tile_stored(5, buf + 16, kInt8Panel * 4);
        store_rows(buf, kInt8Panel, sx + m0, sw + p * kInt8Panel, bias ? bias + p * kInt8Panel : nullptr,
                   out + m0 * N + p * kInt8Panel, N, rows);
      }
    }
    if (configured >= 0) _tile_release();
  });
}
#endif  // AMX

#if defined(__AVX512VNNI__)
#define PARASERVE_VNNI_INT8 1
constexpr int64_t kVnniMaxRows = 10;  // rows per pass: 20 accumulators, as in bf16_gemm.cpp
typedef int32_t Quad __attribute__((may_alias, aligned(1)));

// acc + u (unsigned bytes) . s (signed bytes), as _mm512_dpbusd_epi32. GCC 12 kept a copy of
// every accumulator around the intrinsic (spilling them to the stack past 4 rows: the 4-row
// kernel ran at half speed); the accumulator tied in place keeps them all in registers.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// Rows [0, MB) of xq against one panel: for each 4 bytes of K, the panel's 32 columns are two
// vectors (one row of each tile) and every row of x adds its broadcast 4 bytes to them.
template <int MB>
void vnni_panel_rows(const int8_t* xq, int64_t K, const int8_t* w, const char* prefetch_end, const int32_t* qsum,
                     int32_t* acc_out) {
  __m512i acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const Quad* xi = reinterpret_cast<const Quad*>(xq);  // x's 4-byte groups
  const int64_t ldx_quads = K / 4;
  for (int64_t kb = 0; kb < K / kInt8KBlock; ++kb) {
    const int8_t* wb = w + kb * 2 * 16 * kInt8KBlock;
    // panels lie back to back: the stream goes on into the next one (vec.h, prefetch_stream)
    const char* line = reinterpret_cast<const char*>(wb);
    const bool ahead = line + kStreamL2Ahead + 2 * 16 * kInt8KBlock <= prefetch_end;
    for (int64_t r = 0; r < 16; ++r) {
      if (ahead) prefetch_stream(line + r * 128);
      const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(wb + r * 64), flip);  // w + 128, unsigned
      const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(wb + 16 * kInt8KBlock + r * 64), flip);
      for (int m = 0; m < MB; ++m) {
        const __m512i xb = _mm512_set1_epi32(xi[m * ldx_quads + kb * 16 + r]);
        acc[m][0] = dpbusd(acc[m][0], w0, xb);
        acc[m][1] = dpbusd(acc[m][1], w1, xb);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    const __m512i off = _mm512_set1_epi32(128 * qsum[m]);
    _mm512_storeu_si512(acc_out + m * kInt8Panel, _mm512_sub_epi32(acc[m][0], off));
    _mm512_storeu_si512(acc_out + m * kInt8Panel + 16, _mm512_sub_epi32(acc[m][1], off));
  }
}

using VnniFn = void (*)(const int8_t*, int64_t, const int8_t*, const char*, const int32_t*, int32_t*);
template <int... MB>
constexpr std::array<VnniFn, sizeof...(MB)> vnni_table(std::integer_sequence<int, MB...>) {
  return {&vnni_panel_rows<MB + 1>...};
}
constexpr auto kVnniFns = vnni_table(std::make_integer_sequence<int, kVnniMaxRows>{});

void run_vnni(const int8_t* xq, const float* sx, const int32_t* qsum, const int8_t* wp, const float* sw,
              const at::BFloat16* bias, at::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const int64_t panels = N / kInt8Panel, panel_bytes = K * kInt8Panel;
  const int64_t passes = (M + kVnniMaxRows - 1) / kVnniMaxRows, rows = (M + passes - 1) / passes;
  const char* end = reinterpret_cast<const char*>(wp + panels * panel_bytes);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) int32_t buf[kVnniMaxRows * kInt8Panel];
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t m0 = 0; m0 < M; m0 += rows) {
        const int64_t mb = std::min(rows, M - m0);
        kVnniFns[mb - 1](xq + m0 * K, K, wp + p * panel_bytes, end, qsum + m0, buf);
        store_rows(buf, kInt8Panel, sx + m0, sw + p * kInt8Panel, bias ? bias + p * kInt8Panel : nullptr,
                   out + m0 * N + p * kInt8Panel, N, mb);
      }
    }
  });
}
#endif  // VNNI

}  // namespace

std::vector<at::Tensor> amx_pack_int8(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_floating_point(), "amx_pack_int8 expects a float [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kInt8Panel == 0 && K % kInt8KBlock == 0, "amx_pack_int8 needs N % 32 == 0 and K % 64 == 0, got [",
              N, ", ", K, "]");
  const at::Tensor wf = w.to(at::kFloat);
  const at::Tensor scale = (wf.abs().amax(1) / 127.0f).clamp_min(1e-30f);  // [N]
  const at::Tensor q = (wf / scale.unsqueeze(1)).round().clamp(-127, 127).to(at::kChar);
  // [panel][n in 32][kb][r in 16][4] -> [panel][kb][tile in 2][r][n in 16][4]
  const at::Tensor packed =
      q.view({N / kInt8Panel, 2, 16, K / kInt8KBlock, 16, 4}).permute({0, 3, 1, 4, 2, 5}).contiguous();
  return {packed, scale.contiguous()};
}

namespace {

// What both kernels share: the argument checks, and x quantized per row (int8, scale, sum); run
// (xq, sx, qsum, packed, scale_w, bias or null, out, M, N, K) fills out.
template <typename Run>
at::Tensor int8_product(const char* name, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const std::optional<at::Tensor>& bias, Run&& run) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kBFloat16, name,
              ": x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 6 && packed.scalar_type() == at::kChar && packed.is_contiguous(), name,
              ": packed must come from amx_pack_int8");
  const int64_t N = packed.size(0) * kInt8Panel, K = packed.size(1) * kInt8KBlock, M = x.size(0);
  TORCH_CHECK(x.size(1) == K, name, ": x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N, name, ": scale must be float [N]");
  TORCH_CHECK(!bias || (bias->numel() == N && bias->scalar_type() == at::kBFloat16), name, ": bias must be bf16 [N]");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kBFloat16));
#if defined(__AVX512F__)
  if (M > 0) {
    const at::Tensor xc = x.contiguous();
    std::vector<int8_t> xq(M * K);
    std::vector<float> sx(M);
    std::vector<int32_t> qsum(M);
    quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, xq.data(), sx.data(), qsum.data());
    const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
    run(xq.data(), sx.data(), qsum.data(), packed.data_ptr<int8_t>(), scale.data_ptr<float>(),
        bc ? bc->data_ptr<at::BFloat16>() : nullptr, out.data_ptr<at::BFloat16>(), M, N, K);
  }
#endif
  return out;
}

}  // namespace

at::Tensor amx_int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_available(), "amx_int8_linear: this CPU or kernel offers no AMX tiles");
  return int8_product("amx_int8_linear", x, packed, scale, bias,
                      [](const int8_t* xq, const float* sx, const int32_t*, const int8_t* wp, const float* sw,
                         const at::BFloat16* b, at::BFloat16* out, int64_t M, int64_t N, int64_t K) {
#if defined(PARASERVE_AMX_INT8)
                        run(xq, sx, wp, sw, b, out, M, N, K);
#endif
                      });
}

bool vnni_int8_available() {
#if defined(PARASERVE_VNNI_INT8)
  return true;
#else
  return false;
#endif
}

at::Tensor vnni_int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(vnni_int8_available(), "vnni_int8_linear: this build has no AVX-512 VNNI");
  return int8_product("vnni_int8_linear", x, packed, scale, bias,
                      [](const int8_t* xq, const float* sx, const int32_t* qsum, const int8_t* wp, const float* sw,
                         const at::BFloat16* b, at::BFloat16* out, int64_t M, int64_t N, int64_t K) {
#if defined(PARASERVE_VNNI_INT8)
                        run_vnni(xq, sx, qsum, wp, sw, b, out, M, N, K);
#endif
                      });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  return amx_available() ? amx_int8_linear(x, packed, scale, bias) : vnni_int8_linear(x, packed, scale, bias);
}

}  // namespace paraserve
