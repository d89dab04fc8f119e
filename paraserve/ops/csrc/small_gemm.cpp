// x [M, K] @ w[N, K]^T for the few rows of a decode step.
//
// With M small the product is bound by reading w once from memory; oneDNN's bf16 path reads at
// about half the machine's bandwidth at M = 1 and MKL runs float32 matrix-vector products on one
// thread. Here each thread streams its own band of w's rows, R rows at a time, and every loaded
// row is used for all M inputs while it sits in registers. Software prefetch a few tiles ahead
// keeps enough loads in flight to reach DRAM bandwidth (about 2x over hardware prefetch alone).
#include "ops.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace paraserve {
namespace {

constexpr int64_t kPrefetchTiles = 2;
constexpr int64_t kMaxM = 8;  // rows of x per pass; larger M runs several passes per tile of w

struct Gemm {
  int64_t m, k, n;
  int64_t ldx;  // x row stride in elements
};

// The rows per tile for a pass of M inputs: M * R float accumulators must stay in registers.
constexpr int64_t rows_per_tile(int64_t m) { return m <= 2 ? 8 : (m <= 4 ? 4 : 2); }

// acc[m * R + r] = x[m] . w[r] over K, float32 accumulation; generic over float and bf16. `ahead`
// points at the rows a few tiles on: prefetching them a line per step, interleaved with the
// loads, kept more loads in flight than prefetching a whole tile at once (~20% faster).
template <int64_t M, int64_t R, typename T>
void tile_dot(const T* x, int64_t ldx, const T* w, const T* ahead, int64_t K, float* acc) {
  vec a[M * R] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vec wv[R];
    for (int64_t r = 0; r < R; ++r) {
      __builtin_prefetch(ahead + r * K + k, 0, 3);
      wv[r] = load(w + r * K + k);
    }
    for (int64_t m = 0; m < M; ++m) {
      const vec xv = load(x + m * ldx + k);
      for (int64_t r = 0; r < R; ++r) a[m * R + r] += xv * wv[r];
    }
  }
  for (int64_t i = 0; i < M * R; ++i) acc[i] = hsum(a[i]);
  for (; k < K; ++k) {  // tail of K past the last full vector
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t r = 0; r < R; ++r) acc[m * R + r] += static_cast<float>(x[m * ldx + k]) * static_cast<float>(w[r * K + k]);
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 pairs multiplied exactly and summed in float32 by vdpbf16ps, 32 elements (one cache line)
// per step; the K tail is a masked load (zeros contribute nothing).
template <int64_t M, int64_t R>
inline void dot_step(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, int64_t k,
                     __mmask32 mask, __m512* a) {
  __m512bh wv[R];
  for (int64_t r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
  for (int64_t m = 0; m < M; ++m) {
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
    for (int64_t r = 0; r < R; ++r) a[m * R + r] = _mm512_dpbf16_ps(a[m * R + r], xv, wv[r]);
  }
}

template <int64_t M, int64_t R>
void tile_dot(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, const at::BFloat16* ahead, int64_t K,
              float* acc) {
  __m512 a[M * R];
  for (int64_t i = 0; i < M * R; ++i) a[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int64_t r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);
    dot_step<M, R>(x, ldx, w, K, k, ~__mmask32{0}, a);
  }
  if (k < K) dot_step<M, R>(x, ldx, w, K, k, (__mmask32{1} << (K - k)) - 1, a);
  for (int64_t i = 0; i < M * R; ++i) acc[i] = _mm512_reduce_add_ps(a[i]);
}
#endif

// One pass of M inputs over w's rows [n0, n1): full tiles of R rows, then single rows.
template <int64_t M, typename T>
void pass(const Gemm& g, const T* x, const T* w, const T* bias, T* out, int64_t n0, int64_t n1) {
  constexpr int64_t R = rows_per_tile(M);
  float acc[M * R];
  auto emit = [&](int64_t n, int64_t rows, int64_t r_stride) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t r = 0; r < rows; ++r) {
        const float b = bias ? static_cast<float>(bias[n + r]) : 0.0f;
        out[m * g.n + n + r] = static_cast<T>(acc[m * r_stride + r] + b);
      }
    }
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const int64_t ahead = std::min(n + kPrefetchTiles * R, g.n - R);  // may run into the next band
    tile_dot<M, R>(x, g.ldx, w + n * g.k, w + ahead * g.k, g.k, acc);
    emit(n, R, R);
  }
  for (; n < n1; ++n) {
    tile_dot<M, 1>(x, g.ldx, w + n * g.k, w + n * g.k, g.k, acc);
    emit(n, 1, 1);
  }
}

template <typename T>
void run_band(const Gemm& g, const T* x, const T* w, const T* bias, T* out, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < g.m; m0 += kMaxM) {
    const T* xm = x + m0 * g.ldx;
    T* om = out + m0 * g.n;
    switch (std::min(kMaxM, g.m - m0)) {
      case 1: pass<1>(g, xm, w, bias, om, n0, n1); break;
      case 2: pass<2>(g, xm, w, bias, om, n0, n1); break;
      case 3: pass<3>(g, xm, w, bias, om, n0, n1); break;
      case 4: pass<4>(g, xm, w, bias, om, n0, n1); break;
      case 5: pass<5>(g, xm, w, bias, om, n0, n1); break;
      case 6: pass<6>(g, xm, w, bias, om, n0, n1); break;
      case 7: pass<7>(g, xm, w, bias, om, n0, n1); break;
      default: pass<8>(g, xm, w, bias, om, n0, n1); break;
    }
  }
}

// Rows [n0, n1) of w for all M inputs. Past kMaxM inputs each band of w is passed over several
// times: bands small enough to stay in L2 keep those passes from reading w from memory again.
template <typename T>
void run_rows(const Gemm& g, const T* x, const T* w, const T* bias, T* out, int64_t n0, int64_t n1) {
  constexpr int64_t kL2Band = 64;
  for (int64_t b = n0; b < n1; b += kL2Band) run_band<T>(g, x, w, bias, out, b, std::min(b + kL2Band, n1));
}

template <typename T>
void run(const Gemm& g, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
         at::Tensor& out) {
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  constexpr int64_t kBand = 16;  // rows per scheduling unit, a multiple of every tile height
  at::parallel_for(0, (g.n + kBand - 1) / kBand, 1, [&](int64_t b0, int64_t b1) {
    run_rows<T>(g, xp, wp, bp, op, b0 * kBand, std::min(b1 * kBand, g.n));
  });
}

}  // namespace

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "expected x [M, K] and w [N, K]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_m_linear runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must share a dtype");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == w.scalar_type()),
              "bias must be [N] in w's dtype");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wc = w.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  const Gemm g{x.size(0), x.size(1), w.size(0), xc.stride(0)};
  if (g.m == 0 || g.n == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    run<float>(g, xc, wc, bc, out);
  } else if (x.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(g, xc, wc, bc, out);
  } else {
    TORCH_CHECK(false, "small_m_linear supports float32 and bfloat16, not ", x.scalar_type());
  }
  return out;
}

}  // namespace paraserve
