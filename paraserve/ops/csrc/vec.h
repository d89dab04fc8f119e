// SIMD helpers shared by the CPU kernels: gcc vector types one register wide (16 floats under
// AVX-512, 8 under AVX, 4 under SSE or NEON; built with -march=native), with every shuffle
// derived from the lane count: a fixed 16-lane type split over AVX2 registers ran 9x slower
// than on AVX-512.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace paraserve {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // floats per vec; also the tokens per softmax tile
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vec_i32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t vec_u16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vec_u32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using Lanes = std::make_index_sequence<kLanes>;

inline vec splat(float x) { return vec{} + x; }

template <size_t... J>
inline vec_i32 lane_index(std::index_sequence<J...>) { return vec_i32{static_cast<int32_t>(J)...}; }

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 is the top half of a float32: interleave with zeros, one permute (a widening convert
// compiles to four instructions).
template <size_t... J>
inline vec widen_bf16(vec_u16 h, std::index_sequence<J...>) {
  return reinterpret_cast<vec>(__builtin_shufflevector(vec_u16{}, h, (J % 2 ? kLanes + J / 2 : 0)...));
}

inline vec load(const at::BFloat16* p) {
#if defined(__AVX512F__)
  return (vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#else
  vec_u16 h;
  std::memcpy(&h, p, sizeof h);
  return widen_bf16(h, std::make_index_sequence<2 * kLanes>{});
#endif
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// float32 -> bf16 bits, rounding to nearest even with NaN kept quiet: c10's rule, lane-wise
// (VCVTNEPS2BF16 where the CPU has it: the same bits, except that it flushes float32 denormals
// to zero and keeps a NaN's sign).
inline vec_u16 bf16_bits(vec v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  return (vec_u16)_mm512_cvtneps_pbh((__m512)v);
#else
  const vec_u32 bits = reinterpret_cast<vec_u32>(v);
  vec_u32 r = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  r = v != v ? vec_u32{} + 0x7FC0u : r;
  return __builtin_convertvector(r, vec_u16);
#endif
}

inline void store(at::BFloat16* p, vec v) {
  const vec_u16 h = bf16_bits(v);
  std::memcpy(p, &h, sizeof h);
}

// v rounded to T's precision and back: what storing to T and loading again gives.
inline vec round_as(const float*, vec v) { return v; }
inline vec round_as(const at::BFloat16*, vec v) { return widen_bf16(bf16_bits(v), std::make_index_sequence<2 * kLanes>{}); }

// e^x for x <= 0: Cephes expf (ln 2 range reduction, degree-6 polynomial, ~1 ulp); exactly 0
// below -87, so -inf (a masked score, or the max before any token) gives 0.
inline vec exp_nonpos(vec x) {
  const vec xc = x < -87.0f ? splat(-87.0f) : x;
  const vec n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const vec r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vec two_n = reinterpret_cast<vec>((__builtin_convertvector(n, vec_i32) + 127) << 23);
  return x < -87.0f ? vec{} : p * two_n;
}

// silu(g) = g / (1 + e^-g), written with e^-|g| so the exponential never overflows.
inline vec silu(vec g) {
  const vec neg = g < 0.0f ? g : -g;
  const vec e = exp_nonpos(neg);
  const vec num = g < 0.0f ? g * e : g;  // one division for both branches (each lane's is as before)
  return num / (1.0f + e);
}

inline float silu(float x) {
  const float e = std::exp(x < 0.0f ? x : -x);
  return x < 0.0f ? x * e / (1.0f + e) : x / (1.0f + e);
}

template <int64_t kShift, size_t... J>
inline vec rotate(vec v, std::index_sequence<J...>) {
  return __builtin_shufflevector(v, v, ((J + kShift) % kLanes)...);
}

// A halving tree over the lanes: log2(kLanes) dependent steps, not kLanes - 1.
template <int64_t kShift = kLanes / 2, typename Op>
inline float reduce(vec v, Op op) {
  v = op(v, rotate<kShift>(v, Lanes{}));
  if constexpr (kShift == 1) {
    return v[0];
  } else {
    return reduce<kShift / 2>(v, op);
  }
}

// The first lane of a comparison's result that is set, or -1.
inline int64_t first_set_lane(vec_i32 hit) {
#if defined(__AVX512F__)
  const uint32_t mask = _mm512_test_epi32_mask((__m512i)hit, (__m512i)hit);
  return mask ? __builtin_ctz(mask) : -1;
#else
  for (int64_t j = 0; j < kLanes; ++j) {
    if (hit[j]) return j;
  }
  return -1;
#endif
}

inline float hsum(vec v) {
  return reduce(v, [](auto x, auto y) { return x + y; });
}

inline float hmax(vec v) {
  return reduce(v, [](auto x, auto y) { return x > y ? x : y; });
}

// Half of a halving step: a and b hold rows of kW lanes; output lane j takes lane j % (kW / 2)
// of the low (or high) half of row j / (kW / 2), counting a's rows then b's.
template <int64_t kW, bool kHigh, size_t... J>
inline vec halves(vec a, vec b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, (J / (kW / 2) * kW + (kHigh ? kW / 2 : 0) + J % (kW / 2))...);
}

// Lane i of the result is op over d[i]'s lanes: a transpose-and-reduce in log2(kLanes) halving
// steps (kLanes - 1 ops in all) instead of kLanes separate horizontal reductions, in the same
// tree as reduce (lanes j and j + kLanes / 2 first). Overwrites d.
template <int64_t kW = kLanes, typename Op>
inline vec transpose_reduce(vec* d, Op op) {
  if constexpr (kW == 1) {
    return d[0];
  } else {
    for (int64_t k = 0; k < kW / 2; ++k) {  // kW vecs of kLanes / kW rows -> kW / 2 vecs of twice the rows
      d[k] = op(halves<kW, false>(d[2 * k], d[2 * k + 1], Lanes{}), halves<kW, true>(d[2 * k], d[2 * k + 1], Lanes{}));
    }
    return transpose_reduce<kW / 2>(d, op);
  }
}

inline vec transpose_sum(vec* d) {
  return transpose_reduce(d, [](vec a, vec b) { return a + b; });
}

// Software prefetch for a weight stream read 128 bytes a step (the panel kernels: bf16_gemm.cpp,
// int8_gemm.cpp). Each step requests the two lines kStreamL2Ahead bytes on into L2 and the two
// kStreamL1Ahead bytes on into L1, so the requests spread over the compute instead of queueing in
// one burst per block; the caller stops once the lines would pass the stream's end. Hardware
// prefetch alone ran the bf16 panels at half speed. On a Zen 4 (SmolLM2's 120 layer products, 2
// threads) 10 rows went 7.5 -> 6.6 ms and 1 row 6.0 -> 5.5 ms against one burst of L2 prefetches
// per 2 KB block one panel on (16 KB ahead); 8 KB ahead ran 10 rows ~4% faster than 16 KB, 1 row
// alike; 4, 12 and 32 KB and two panels on were slower.
constexpr int64_t kStreamL2Ahead = 8192, kStreamL1Ahead = 2048;

inline void prefetch_stream(const char* at) {
  __builtin_prefetch(at + kStreamL2Ahead, 0, 2);
  __builtin_prefetch(at + kStreamL2Ahead + 64, 0, 2);
  __builtin_prefetch(at + kStreamL1Ahead, 0, 3);
  __builtin_prefetch(at + kStreamL1Ahead + 64, 0, 3);
}

}  // namespace paraserve
