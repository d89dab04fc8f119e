// x [M, K] @ w[N, K]^T in bfloat16 on AVX-512 BF16 (VDPBF16PS), for CPUs without AMX (AMD Zen 4
// and later, Intel Cooper Lake), reading amx_pack_weight's panel layout.
//
// small_m_linear takes a dot product per (row of x, row of w): every output needs a horizontal
// sum at the end and its M inputs share each loaded w vector only while it sits in registers,
// so past a few rows it ran at a third of the machine's bf16 peak and a 12-node draft tree cost
// twice a single token. Here a vector holds 16 output columns instead: w's panel layout gives,
// for each pair of K elements, the 32 columns of a panel as two vectors, and each row of x
// contributes its broadcast pair to them (one VDPBF16PS per row and vector, no horizontal sums).
// Up to 10 rows run on 20 accumulators while a panel streams from memory once. Up to ~6 rows the
// weight stream is the bound, as on AMX tiles; at 10 the VDPBF16PS work (one a cycle on a Zen 4
// core) nears it and a pass costs ~20% more than one row. At large M it runs at the machine's
// bf16 peak (on par with oneDNN at 512 rows, ~10% faster at 16-64).
//
// Every output column sums its K pairs in the same order whatever M is, so a row's result does
// not depend on the rows around it: a draft tree gets the numbers its tokens get one by one.
#include "ops.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace paraserve {

#if defined(__AVX512BF16__)
namespace {

constexpr int64_t kPanel = 32;   // output columns per panel (two vectors)
constexpr int64_t kKBlock = 32;  // K elements per block of the panel layout
constexpr int64_t kBlockElems = kKBlock * kPanel;  // one K block of a panel: two 16 x 32 tiles
// Rows per pass over a panel (20 of the 32 vector registers accumulate). On Zen 4 a pass of 10
// rows cost what one row does; 12 in one pass ran ~15% slower than two passes of 6.
constexpr int64_t kMaxRows = 10;

// Rows [0, MB) of x against one panel: K blocks of 16 pairs, each pair giving two vectors of w
// (columns 0-15 from the first tile, 16-31 from the second); then bias, bf16 rounding, store.
template <int MB>
void panel_rows(const at::BFloat16* x, int64_t ldx, const at::BFloat16* wp, const char* prefetch_end,
                const at::BFloat16* bias, at::BFloat16* out, int64_t ldo, int64_t K) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int32_t* xi = reinterpret_cast<const int32_t*>(x);  // bf16 pairs
  const int64_t ldx_pairs = ldx / 2;
  for (int64_t kb = 0; kb < K / kKBlock; ++kb) {
    const at::BFloat16* w = wp + kb * kBlockElems;
    // panels lie back to back: the stream goes on into the next one (vec.h, prefetch_stream)
    const char* line = reinterpret_cast<const char*>(w);
    const bool ahead = line + kStreamL2Ahead + kBlockElems * 2 <= prefetch_end;
    for (int64_t kp = 0; kp < kKBlock / 2; ++kp) {
      if (ahead) prefetch_stream(line + kp * 128);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + kp * 32);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + kBlockElems / 2 + kp * 32);
      const int64_t pair = kb * (kKBlock / 2) + kp;
      for (int m = 0; m < MB; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(xi[m * ldx_pairs + pair]);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
      }
    }
  }
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias) {  // bf16 -> float32: shift into the top half
    b0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)bias)), 16));
    b1 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bias + 16))), 16));
  }
  for (int m = 0; m < MB; ++m) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_add_ps(acc[m][1], b1), _mm512_add_ps(acc[m][0], b0));
    _mm512_storeu_si512(out + m * ldo, (__m512i)v);
  }
}

using PanelFn = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, const char*, const at::BFloat16*,
                         at::BFloat16*, int64_t, int64_t);

template <int... MB>
constexpr std::array<PanelFn, sizeof...(MB)> panel_table(std::integer_sequence<int, MB...>) {
  return {&panel_rows<MB + 1>...};
}
constexpr auto kPanelFns = panel_table(std::make_integer_sequence<int, kMaxRows>{});

void run(const at::BFloat16* x, int64_t ldx, const at::BFloat16* wp, const at::BFloat16* bias, at::BFloat16* out,
         int64_t M, int64_t N, int64_t K) {
  const int64_t panels = N / kPanel, panel_elems = K * kPanel;
  // passes of at most kMaxRows rows, as even as they can be (12 rows: 6 + 6, not 10 + 2)
  const int64_t passes = (M + kMaxRows - 1) / kMaxRows, rows = (M + passes - 1) / passes;
  const char* end = reinterpret_cast<const char*>(wp + panels * panel_elems);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const at::BFloat16* w = wp + p * panel_elems;
      const at::BFloat16* b = bias ? bias + p * kPanel : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += rows) {
        const int64_t mb = std::min(rows, M - m0);
        kPanelFns[mb - 1](x + m0 * ldx, ldx, w, end, b, out + m0 * N + p * kPanel, N, K);
      }
    }
  });
}

}  // namespace

bool avx512_bf16_available() { return true; }
#else
bool avx512_bf16_available() { return false; }
#endif

at::Tensor bf16_panel_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(avx512_bf16_available(), "bf16_panel_linear: this build has no AVX-512 BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "bf16_panel_linear: x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 6 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "bf16_panel_linear: packed must come from amx_pack_weight");
  const int64_t N = packed.size(0) * packed.size(2) * packed.size(4), K = packed.size(1) * 32;
  TORCH_CHECK(x.size(1) == K, "bf16_panel_linear: x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kBFloat16),
              "bf16_panel_linear: bias must be bf16 [N]");
  const at::Tensor xc = x.stride(1) == 1 && x.stride(0) % 2 == 0 ? x : x.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({x.size(0), N}, x.options());
#if defined(__AVX512BF16__)
  if (x.size(0) > 0) {
    run(xc.data_ptr<at::BFloat16>(), xc.stride(0), packed.data_ptr<at::BFloat16>(),
        bc ? bc->data_ptr<at::BFloat16>() : nullptr, out.data_ptr<at::BFloat16>(), x.size(0), N, K);
  }
#endif
  return out;
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  return amx_available() ? amx_linear(x, packed, bias) : bf16_panel_linear(x, packed, bias);
}

}  // namespace paraserve
