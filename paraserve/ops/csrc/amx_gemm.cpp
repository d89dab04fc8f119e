// x [M, K] @ w[N, K]^T in bfloat16 on Intel AMX tiles (Sapphire Rapids and later).
//
// The AVX-512 small-M kernel is bound by reading w at one row, but its cost grows with M past
// ~8 rows (each row is a separate dot product on the vector units), so a 16-node draft tree or a
// 64-sequence decode step ran 2.5-10x slower than one token. A tile multiply (TDPBF16PS) does a
// 16 x 16 x 32 block per instruction, so up to a few dozen rows cost the same as one: the weight
// stream from memory stays the bound. Rows are independent in a tile product and every row sums
// its K blocks in the same order whatever M is, so a row's result does not depend on the other
// rows: a draft tree gets bit-identical numbers to decoding its tokens one by one.
//
// w is packed once (amx_pack_weight): panels of 32 output columns, each panel a contiguous run
// over K of two 16 x 32 tiles in the VNNI pair layout [k / 2][n][k % 2], so every thread streams
// one contiguous range and the hardware prefetcher plus a software prefetch keep DRAM busy.
#include "amx.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#if defined(PARASERVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace paraserve {

constexpr int64_t kPanel = 32;  // output columns per panel: two tiles of 16
constexpr int64_t kKBlock = 32;  // bf16 elements of K per tile row (64 bytes)

#if defined(PARASERVE_AMX)
namespace {

constexpr int64_t kTileElems = 16 * kKBlock;  // one B tile: 16 pair-rows x 16 columns x 2
constexpr int64_t kPrefetchSteps = 4;  // K blocks ahead (8 KB) the prefetch runs

using amx::TileConfig;

// Tiles: 0, 1 = x rows [m0, m0 + 16) and [m0 + 16, m0 + 32); 2, 3 = the panel's two column
// tiles; 4 + 2 * a + b = the output block of x tile a and column tile b.
void configure(int64_t rows0, int64_t rows1) {
  TileConfig c;
  const int64_t rows[2] = {rows0, rows1};
  for (int a = 0; a < 2; ++a) {
    c.rows[a] = static_cast<uint8_t>(rows[a]);
    c.colsb[a] = rows[a] ? 64 : 0;
    for (int b = 0; b < 2; ++b) {
      c.rows[4 + 2 * a + b] = static_cast<uint8_t>(rows[a]);
      c.colsb[4 + 2 * a + b] = rows[a] ? 64 : 0;
    }
  }
  for (int b = 2; b < 4; ++b) {
    c.rows[b] = 16;
    c.colsb[b] = 64;
  }
  _tile_loadconfig(&c);
}

// One panel (32 columns) for x rows [m0, m0 + rows0 + rows1): the K loop on tiles, then the
// float32 blocks rounded to bf16 (plus bias) into out.
template <bool kTwoRowTiles>
void panel_block(const at::BFloat16* x, int64_t ldx, const at::BFloat16* wp, const at::BFloat16* next_panel,
                 const at::BFloat16* bias, at::BFloat16* out, int64_t ldo, int64_t K, int64_t rows0,
                 int64_t rows1, float* buf) {
  _tile_zero(4);
  _tile_zero(5);
  if constexpr (kTwoRowTiles) {
    _tile_zero(6);
    _tile_zero(7);
  }
  const int64_t kb_count = K / kKBlock;
  const int64_t stride = ldx * static_cast<int64_t>(sizeof(at::BFloat16));
  for (int64_t kb = 0; kb < kb_count; ++kb) {
    const at::BFloat16* w = wp + kb * 2 * kTileElems;
    const int64_t ahead = kb + kPrefetchSteps;
    const char* pf = reinterpret_cast<const char*>(
        ahead < kb_count ? wp + ahead * 2 * kTileElems : next_panel + (ahead - kb_count) * 2 * kTileElems);
    for (int line = 0; line < 2 * kTileElems * 2; line += 64) _mm_prefetch(pf + line, _MM_HINT_T0);
    _tile_loadd(0, x + kb * kKBlock, stride);
    if constexpr (kTwoRowTiles) _tile_loadd(1, x + 16 * ldx + kb * kKBlock, stride);
    _tile_loadd(2, w, 64);
    _tile_loadd(3, w + kTileElems, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if constexpr (kTwoRowTiles) {
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  // buf [32 rows][32 columns] float32
  _tile_stored(4, buf, kPanel * 4);
  _tile_stored(5, buf + 16, kPanel * 4);
  if constexpr (kTwoRowTiles) {
    _tile_stored(6, buf + 16 * kPanel, kPanel * 4);
    _tile_stored(7, buf + 16 * kPanel + 16, kPanel * 4);
  }
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias) {  // bf16 -> float32: shift into the top half
    b0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)bias)), 16));
    b1 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bias + 16))), 16));
  }
  for (int64_t m = 0; m < rows0 + rows1; ++m) {
    const __m512 lo = _mm512_add_ps(_mm512_loadu_ps(buf + m * kPanel), b0);
    const __m512 hi = _mm512_add_ps(_mm512_loadu_ps(buf + m * kPanel + 16), b1);
    const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);  // round to nearest even, as torch does
    _mm512_storeu_si512(out + m * ldo, (__m512i)v);
  }
}

void run(const at::BFloat16* x, int64_t ldx, const at::BFloat16* wp, const at::BFloat16* bias, at::BFloat16* out,
         int64_t M, int64_t N, int64_t K) {
  const int64_t panels = N / kPanel;
  const int64_t panel_elems = K * kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float buf[kPanel * kPanel];
    int64_t configured0 = -1, configured1 = -1;
    for (int64_t p = p0; p < p1; ++p) {
      const at::BFloat16* w = wp + p * panel_elems;
      const at::BFloat16* next = wp + std::min(p + 1, panels - 1) * panel_elems;
      const at::BFloat16* b = bias ? bias + p * kPanel : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int64_t rows0 = std::min<int64_t>(16, M - m0);
        const int64_t rows1 = std::clamp<int64_t>(M - m0 - 16, 0, 16);
        if (rows0 != configured0 || rows1 != configured1) {
          configure(rows0, rows1);
          configured0 = rows0;
          configured1 = rows1;
        }
        at::BFloat16* o = out + m0 * N + p * kPanel;
        if (rows1) {
          panel_block<true>(x + m0 * ldx, ldx, w, next, b, o, N, K, rows0, rows1, buf);
        } else {
          panel_block<false>(x + m0 * ldx, ldx, w, next, b, o, N, K, rows0, 0, buf);
        }
      }
    }
    if (configured0 >= 0) _tile_release();
  });
}

}  // namespace

bool amx_available() {
  // Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA), once per process; a kernel without it means no AMX.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}
#else
bool amx_available() { return false; }
#endif

at::Tensor amx_pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "amx_pack_weight expects a bf16 [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kPanel == 0 && K % kKBlock == 0, "amx_pack_weight needs N % 32 == 0 and K % 32 == 0, got [",
              N, ", ", K, "]");
  // [panel][n in 32][kb][kp in 16][pair] -> [panel][kb][tile in 2][kp][n in 16][pair]
  return w.contiguous()
      .view({N / kPanel, 2, 16, K / kKBlock, 16, 2})
      .permute({0, 3, 1, 4, 2, 5})
      .contiguous();
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_available(), "amx_linear: this CPU or kernel offers no AMX tiles");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "amx_linear: x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 6 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "amx_linear: packed must come from amx_pack_weight");
  const int64_t N = packed.size(0) * kPanel, K = packed.size(1) * kKBlock;
  TORCH_CHECK(x.size(1) == K, "amx_linear: x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kBFloat16),
              "amx_linear: bias must be bf16 [N]");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({x.size(0), N}, x.options());
#if defined(PARASERVE_AMX)
  if (x.size(0) > 0) {
    run(xc.data_ptr<at::BFloat16>(), xc.stride(0), packed.data_ptr<at::BFloat16>(),
        bc ? bc->data_ptr<at::BFloat16>() : nullptr, out.data_ptr<at::BFloat16>(), x.size(0), N, K);
  }
#endif
  return out;
}

}  // namespace paraserve
