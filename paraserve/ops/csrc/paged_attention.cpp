// Decode attention straight from the paged KV cache on CPU.
//
// The torch reference gathers every request's K/V rows into a contiguous copy before SDPA, which
// doubles the memory traffic of a step that is memory-bound already. Here each (request, KV head)
// walks its block table once, a tile of tokens at a time, keeping an online softmax per query
// head (running max and sum, the accumulator rescaled when the max grows). The G = H / KVH query
// heads sharing a KV head all use each tile of K/V rows while it sits in L1, so every row comes
// from memory once.
//
// Tree verification uses the same walk: a draft-tree node is a query whose keys are its
// request's context (through the block table) followed by its ancestors' slots in depth order
// (`extra`). On the accepted path that is exactly the key sequence plain decoding would see, in
// the same tiles, so verification reproduces decoding's numbers bit for bit. On the bf16 vector
// path a tree's nodes (up to 4 at a time) share the walk of their context's full tiles: each
// tile's K rows are transposed and its V rows interleaved once, every node scores the tile with
// the keys in lanes, summing as the one-query walk does, and the chunk's softmax reductions run
// as two transposes (attend_tree_bf16). Tree of 8 nodes, SmolLM2's 30 layers, 2 threads of a Zen
// 4, alternating builds: 1.01-1.12 -> 0.69-0.79 ms at 176 tokens of context, 2.05-2.10 ->
// 1.37-1.43 ms at 400, 10.0-10.6 -> 6.2-6.7 ms at 2,000; lone decode queries walk as before.
#include "ops.h"
#include "paged_attention.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace paraserve {
namespace {

using attention::Problem;
using attention::kPrefetchTiles;
using attention::prefetch_first_tiles;
using attention::prefetch_tile;
using attention::row_pointers;

// Per-thread state of one (request, KV head): its G query heads, their accumulators and running
// softmax, and the current tile's row pointers. Sized once per call.
template <typename T>
struct Scratch {
  std::vector<vec> q, acc;  // [G, D / kLanes]
  std::vector<float> m, l;  // [G]
  std::vector<const T*> krows, vrows;  // [kLanes]
  Scratch(int64_t g, int64_t d) : q(g * d / kLanes), acc(g * d / kLanes), m(g), l(g), krows(kLanes), vrows(kLanes) {}
};

constexpr int64_t kMaxTreeChunk = 4;  // tree nodes sharing one walk of their context (attend_tree_bf16)

// The tile's row pointers in w; its unused slots repeat its first row, so scoring a full tile
// reads valid memory (those lanes are masked).
template <typename T>
void tile_rows(const Problem<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n, Scratch<T>& w) {
  row_pointers(p, b, h, t0, n, w.krows.data(), w.vrows.data());
  std::fill(w.krows.begin() + n, w.krows.end(), w.krows[0]);
  std::fill(w.vrows.begin() + n, w.vrows.end(), w.vrows[0]);
}

// While tile t0 is in use, request the one kPrefetchTiles on.
template <typename T>
void prefetch_ahead(const Problem<T>& p, int64_t b, int64_t h, int64_t t0, int64_t len) {
  if (t0 + kPrefetchTiles * kLanes < len) prefetch_tile(p, b, h, t0 + kPrefetchTiles * kLanes);
}

// The tile walk both kernels share: tokens [0, len) of query b, KV head h, kLanes at a time,
// rows prefetched ahead and their pointers in w; body(n) for each tile of n tokens.
template <typename T, typename F>
void for_each_tile(const Problem<T>& p, int64_t b, int64_t h, int64_t len, Scratch<T>& w, F&& body,
                   int64_t first = 0) {
  prefetch_first_tiles(p, b, h, len, first);
  for (int64_t t0 = first; t0 < len; t0 += kLanes) {
    const int64_t n = std::min(kLanes, len - t0);
    prefetch_ahead(p, b, h, t0, len);
    tile_rows(p, b, h, t0, n, w);
    body(n);
  }
}

// q . k_i for the tile's rows; kC = D / kLanes when fixed at compile time, else 0.
template <int64_t kC, typename T>
vec score(const vec* q, const T* const* rows, int64_t nc_rt) {
  const int64_t nc = kC ? kC : nc_rt;
  vec d[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) {
    vec dot = {};
    for (int64_t c = 0; c < nc; ++c) dot += q[c] * load(rows[i] + c * kLanes);
    d[i] = dot;
  }
  return transpose_sum(d);
}

// Folds a tile's scores into one head's running max m and sum l, rescaling its accumulator when
// the max grows; returns the tile's unnormalised probabilities.
inline vec softmax_update(vec s, float& m, float& l, vec* acc, int64_t nc) {
  const float new_m = std::max(m, hmax(s));
  const float corr = new_m == m ? 1.0f : exp_nonpos(splat(m - new_m))[0];  // the max settles early
  const vec p = exp_nonpos(s - new_m);
  m = new_m;
  l = l * corr + hsum(p);
  if (corr != 1.0f) {
    for (int64_t c = 0; c < nc; ++c) acc[c] *= corr;
  }
  return p;
}

// acc += sum_i p[i] * v_i over the tile's n rows; with kC fixed, acc stays in registers.
template <int64_t kC, typename T>
void accumulate(vec p, const T* const* rows, int64_t n, int64_t nc_rt, vec* acc_out) {
  if constexpr (kC > 0) {
    vec acc[kC];
    for (int64_t c = 0; c < kC; ++c) acc[c] = acc_out[c];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < kC; ++c) acc[c] += p[i] * load(rows[i] + c * kLanes);
    }
    for (int64_t c = 0; c < kC; ++c) acc_out[c] = acc[c];
  } else {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < nc_rt; ++c) acc_out[c] += p[i] * load(rows[i] + c * kLanes);
    }
  }
}

#if defined(__AVX512BF16__)
// One query's running softmax for its G <= 4 heads (D <= 128) after a tree's shared tiles
// (attend_tree_bf16), for attend_bf16 to go on from.
struct NodeState {
  float m[4], l[4];
  vec acc[4][8];
};

// Interleaves a pair of V rows' 16 dims at c * 16 (one permute) for VDPBF16PS over the pair.
inline __m512i interleave_v(const at::BFloat16* v0, const at::BFloat16* v1, int64_t c) {
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                         38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + c * 16))), order,
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + c * 16))));
}

// bf16 with D = 32 * kV: q . k on vdpbf16ps (bf16 products are exact, sums float32; the scale
// applies to the sum), and p . V on it too, with p rounded to bf16 as flash attention does on
// GPUs. A pair of V rows is interleaved once (one permute per 16 dims) and used by all G query
// heads, whose accumulators stay in registers. About 2x fewer instructions than widening every
// bf16 row to float32 for each head. From tile `first` on, with `from`'s state (a tree node after
// its shared tiles), else from the start.
template <int64_t kC, int64_t G>
void attend_bf16(const Problem<at::BFloat16>& p, int64_t b, int64_t h, Scratch<at::BFloat16>& w,
                 const NodeState* from = nullptr, int64_t first = 0) {
  constexpr int64_t kV = kC / 2;
  const int64_t len = p.length(b), offset = (b * p.heads + h * G) * p.head_dim;
  __m512bh q[G][kV];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t v = 0; v < kV; ++v) q[g][v] = (__m512bh)_mm512_loadu_si512(p.q + offset + g * p.head_dim + v * 32);
  }
  vec acc[G][kC] = {};
  float m[G], l[G];
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.0f);
  if (from) {
    for (int64_t g = 0; g < G; ++g) {
      m[g] = from->m[g];
      l[g] = from->l[g];
      for (int64_t c = 0; c < kC; ++c) acc[g][c] = from->acc[g][c];
    }
  }
  alignas(64) uint32_t pairs[G][kLanes / 2];  // each head's tile probabilities, as bf16 pairs
  for_each_tile(p, b, h, len, w, [&](int64_t n) {
    for (int64_t g = 0; g < G; ++g) {
      vec d[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t v = 0; v < kV; ++v) {
          dot = _mm512_dpbf16_ps(dot, q[g][v], (__m512bh)_mm512_loadu_si512(w.krows[i] + v * 32));
        }
        d[i] = (vec)dot;
      }
      vec s = transpose_sum(d) * p.scale;
      s = lane_index(Lanes{}) < static_cast<int32_t>(n) ? s : splat(-std::numeric_limits<float>::infinity());
      const vec probs = softmax_update(s, m[g], l[g], acc[g], kC);  // masked lanes are exactly 0
      _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[g]), (__m256i)_mm512_cvtneps_pbh((__m512)probs));
    }
    for (int64_t k = 0; k < (n + 1) / 2; ++k) {
      const at::BFloat16* v0 = w.vrows[2 * k];
      const at::BFloat16* v1 = w.vrows[2 * k + 1];  // past n: a valid row with p = 0
      for (int64_t c = 0; c < kC; ++c) {
        const __m512i rows = interleave_v(v0, v1, c);
        for (int64_t g = 0; g < G; ++g) {
          acc[g][c] = (vec)_mm512_dpbf16_ps((__m512)acc[g][c], (__m512bh)_mm512_set1_epi32(pairs[g][k]),
                                            (__m512bh)rows);
        }
      }
    }
  }, first);
  for (int64_t g = 0; g < G; ++g) {
    const float inv = len > 0 ? 1.0f / l[g] : 0.0f;
    for (int64_t c = 0; c < kC; ++c) store(p.out + offset + (g * kC + c) * kLanes, acc[g][c] * inv);
  }
}

// softmax_update for every (node, head) of a tree chunk at once (sc[i * G + g], nodes * G <= kLanes),
// with the same numbers: the tile maxima come from one transpose-and-max (a maximum does not
// depend on the order) and the sums from transpose_sum, which adds in hsum's order; the per-pair
// steps are softmax_update's. Cuts the dependent shuffle chains of 2 x nodes x G horizontal
// reductions to two transposes.
inline void softmax_update_all(vec* sc, int64_t nodes, int64_t G, NodeState* st, int64_t nc) {
  const int64_t n = nodes * G;
  vec t[kLanes];
  for (int64_t c = 0; c < kLanes; ++c) t[c] = sc[c < n ? c : 0];
  const vec tile_max = transpose_reduce(t, [](vec a, vec b) { return a > b ? a : b; });
  vec m = {};
  for (int64_t c = 0; c < n; ++c) m[c] = st[c / G].m[c % G];
  const vec new_m = m < tile_max ? tile_max : m;  // std::max(m, hmax(s))
  const vec corr = exp_nonpos(m - new_m);
  for (int64_t c = 0; c < n; ++c) t[c] = sc[c] = exp_nonpos(sc[c] - new_m[c]);
  for (int64_t c = n; c < kLanes; ++c) t[c] = sc[0];
  const vec sums = transpose_sum(t);
  for (int64_t c = 0; c < n; ++c) {
    NodeState& s = st[c / G];
    const int64_t g = c % G;
    const float cf = new_m[c] == s.m[g] ? 1.0f : corr[c];
    s.m[g] = new_m[c];
    s.l[g] = s.l[g] * cf + sums[c];
    if (cf != 1.0f) {
      for (int64_t k = 0; k < nc; ++k) s.acc[g][k] *= cf;
    }
  }
}

// A full tile's K rows as bf16 pairs, transposed: kt[P] lane i is pair P of row i (P < 16 * kV).
// Four shuffle steps per 16 x 16 block of pairs.
template <int64_t kV>
void transpose_pairs(const at::BFloat16* const* rows, __m512i* kt) {
  for (int64_t v = 0; v < kV; ++v) {
    __m512i r[16], a[16], b[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows[i] + v * 32);
    for (int k = 0; k < 8; ++k) {  // per 128-bit lane L: pairs 4L..4L+3 of rows 2k, 2k + 1, interleaved
      a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
      a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {  // b[4k + c], lane L: pair 4L + c of rows 4k..4k + 3
      b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
      b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
      b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
      b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // then a 4 x 4 transpose of 128-bit lanes
      const __m512i u0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
      const __m512i u2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
      const __m512i u3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
      kt[v * 16 + c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
      kt[v * 16 + 4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
      kt[v * 16 + 8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
      kt[v * 16 + 12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
  }
}

// A full tile's scores for a query's G heads (q pairs at qp + g * stride): what score-then-
// transpose_sum gives, bit for bit, with the keys in lanes. attend_bf16's lane j of key i sums
// pairs j, 16 + j, ... of q and k_i on VDPBF16PS; here x_j does the same with key i in lane i
// (the same products in the same places: VDPBF16PS's bf16 products are exact, so which operand
// is which does not matter), and the x_j are added in transpose_sum's tree: lanes j and j + 8,
// then + 4, + 2, + 1. Each pair column of K is loaded once for the G heads.
template <int64_t kV, int64_t G>
void tile_scores(const int32_t* qp, int64_t stride, const __m512i* kt, vec* s) {
  auto x = [&](int64_t j, vec* out) {  // out[g] = x_j + x_{j + 8}
    __m512 lo[G], hi[G];
    for (int64_t g = 0; g < G; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t v = 0; v < kV; ++v) {
      const __m512bh k_lo = (__m512bh)kt[v * 16 + j], k_hi = (__m512bh)kt[v * 16 + j + 8];
      for (int64_t g = 0; g < G; ++g) {
        lo[g] = _mm512_dpbf16_ps(lo[g], k_lo, (__m512bh)_mm512_set1_epi32(qp[g * stride + v * 16 + j]));
        hi[g] = _mm512_dpbf16_ps(hi[g], k_hi, (__m512bh)_mm512_set1_epi32(qp[g * stride + v * 16 + j + 8]));
      }
    }
    for (int64_t g = 0; g < G; ++g) out[g] = (vec)lo[g] + (vec)hi[g];
  };
  vec a[G], b[G], z[G], w[G];
  x(0, a), x(4, b);
  for (int64_t g = 0; g < G; ++g) z[g] = a[g] + b[g];
  x(2, a), x(6, b);
  for (int64_t g = 0; g < G; ++g) w[g] = z[g] + (a[g] + b[g]);
  x(1, a), x(5, b);
  for (int64_t g = 0; g < G; ++g) z[g] = a[g] + b[g];
  x(3, a), x(7, b);
  for (int64_t g = 0; g < G; ++g) s[g] = w[g] + (z[g] + (a[g] + b[g]));
}

// Tree nodes b0..b0 + nodes - 1 of one request (same context through the same table), KV head
// h: the tiles wholly inside the context are read, transposed and interleaved once for all of
// them, each node scoring them as attend_bf16 would; then each node goes on alone over its last
// tiles (the context's tail, its ancestors). Bit-identical to attending one node at a time.
template <int64_t kC, int64_t G>
void attend_tree_bf16(const Problem<at::BFloat16>& p, int64_t b0, int64_t nodes, int64_t h,
                      Scratch<at::BFloat16>& w) {
  constexpr int64_t kV = kC / 2;
  const int64_t shared = p.seq_lens[b0] / kLanes * kLanes;
  NodeState st[kMaxTreeChunk];
  for (int64_t i = 0; i < nodes; ++i) {
    std::fill(st[i].m, st[i].m + G, -std::numeric_limits<float>::infinity());
    std::fill(st[i].l, st[i].l + G, 0.0f);
    for (int64_t g = 0; g < G; ++g) std::fill(st[i].acc[g], st[i].acc[g] + kC, vec{});
  }
  alignas(64) __m512i kt[16 * kV];
  alignas(64) __m512i vi[kLanes / 2][kC];
  alignas(64) uint32_t pairs[G][kLanes / 2];
  for_each_tile(p, b0, h, shared, w, [&](int64_t) {
    transpose_pairs<kV>(w.krows.data(), kt);
    for (int64_t k = 0; k < kLanes / 2; ++k) {
      for (int64_t c = 0; c < kC; ++c) vi[k][c] = interleave_v(w.vrows[2 * k], w.vrows[2 * k + 1], c);
    }
    vec sc[kLanes];  // (node i, head g) at i * G + g
    for (int64_t i = 0; i < nodes; ++i) {
      tile_scores<kV, G>(reinterpret_cast<const int32_t*>(p.q + ((b0 + i) * p.heads + h * G) * p.head_dim),
                         p.head_dim / 2, kt, sc + i * G);
      for (int64_t g = 0; g < G; ++g) sc[i * G + g] *= p.scale;
    }
    softmax_update_all(sc, nodes, G, st, kC);  // sc: the tile's probabilities
    for (int64_t i = 0; i < nodes; ++i) {
      NodeState& s = st[i];
      for (int64_t g = 0; g < G; ++g) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[g]), (__m256i)_mm512_cvtneps_pbh((__m512)sc[i * G + g]));
      }
      vec acc[G][kC];
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t c = 0; c < kC; ++c) acc[g][c] = s.acc[g][c];
      }
      for (int64_t k = 0; k < kLanes / 2; ++k) {
        for (int64_t c = 0; c < kC; ++c) {
          for (int64_t g = 0; g < G; ++g) {
            acc[g][c] = (vec)_mm512_dpbf16_ps((__m512)acc[g][c], (__m512bh)_mm512_set1_epi32(pairs[g][k]),
                                              (__m512bh)vi[k][c]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t c = 0; c < kC; ++c) s.acc[g][c] = acc[g][c];
      }
    }
  });
  for (int64_t i = 0; i < nodes; ++i) attend_bf16<kC, G>(p, b0 + i, h, w, &st[i], shared);
}

// The bf16 path for this head size and group, or false.
template <int64_t kC>
bool attend_bf16_dispatch(const Problem<at::BFloat16>& p, int64_t b, int64_t h, Scratch<at::BFloat16>& w) {
  if constexpr (kC == 4 || kC == 8) {
    switch (p.heads / p.kv_heads) {
      case 1: attend_bf16<kC, 1>(p, b, h, w); return true;
      case 2: attend_bf16<kC, 2>(p, b, h, w); return true;
      case 3: attend_bf16<kC, 3>(p, b, h, w); return true;
      case 4: attend_bf16<kC, 4>(p, b, h, w); return true;
      default: return false;
    }
  }
  return false;
}
#endif

// One query b, one KV head h: its G query heads attend over the query's tokens.
template <int64_t kC, typename T>
void attend(const Problem<T>& p, int64_t b, int64_t h, Scratch<T>& w) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (attend_bf16_dispatch<kC>(p, b, h, w)) return;
  }
#endif
  const int64_t nc = kC ? kC : p.head_dim / kLanes, g_heads = p.heads / p.kv_heads;
  const int64_t len = p.length(b), offset = (b * p.heads + h * g_heads) * p.head_dim;
  for (int64_t c = 0; c < g_heads * nc; ++c) w.q[c] = load(p.q + offset + c * kLanes) * p.scale;
  std::fill(w.acc.begin(), w.acc.end(), vec{});
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  for_each_tile(p, b, h, len, w, [&](int64_t n) {
    for (int64_t g = 0; g < g_heads; ++g) {
      vec s = score<kC>(w.q.data() + g * nc, w.krows.data(), nc);
      s = lane_index(Lanes{}) < static_cast<int32_t>(n) ? s : splat(-std::numeric_limits<float>::infinity());
      const vec probs = softmax_update(s, w.m[g], w.l[g], w.acc.data() + g * nc, nc);
      accumulate<kC>(probs, w.vrows.data(), n, nc, w.acc.data() + g * nc);
    }
  });
  for (int64_t g = 0; g < g_heads; ++g) {
    const float inv = len > 0 ? 1.0f / w.l[g] : 0.0f;  // an empty sequence attends to nothing
    for (int64_t c = 0; c < nc; ++c) store(p.out + offset + (g * nc + c) * kLanes, w.acc[g * nc + c] * inv);
  }
}

// A unit of work: queries b..b + count - 1 (a chunk of one tree's nodes, or one query), KV head h.
struct Unit {
  int64_t b, count, h;
};

// Whether query b + 1 is another node of query b's tree: both have extra slots (decode queries
// have none) and the same context through the same table.
template <typename T>
bool same_tree(const Problem<T>& p, int64_t b) {
  if (!p.extra_lens || p.extra_lens[b] == 0 || p.extra_lens[b + 1] == 0 || p.seq_lens[b] != p.seq_lens[b + 1]) {
    return false;
  }
  const int64_t blocks = (p.seq_lens[b] + p.block_size - 1) / p.block_size;
  const int64_t* t = p.tables + b * p.max_blocks;
  return std::equal(t, t + blocks, t + p.max_blocks);
}

// Each run of a tree's nodes with at least a tile of context in chunks that share its walk
// (attend_tree_bf16) where that path runs; every other query alone. Chunks are split evenly and
// hold at most half a tree, so a small tree still gives both threads work.
template <int64_t kC, typename T>
std::vector<Unit> plan_units(const Problem<T>& p) {
  bool grouped = false;
#if defined(__AVX512BF16__)
  grouped = std::is_same_v<T, at::BFloat16> && (kC == 4 || kC == 8) && p.heads / p.kv_heads <= 4;
#endif
  std::vector<Unit> units;
  units.reserve(p.batch * p.kv_heads);  // at most one unit per query and KV head: one allocation a call
  for (int64_t b = 0; b < p.batch;) {
    int64_t n = 1;
    while (grouped && b + n < p.batch && same_tree(p, b + n - 1)) ++n;
    if (p.seq_lens[b] < kLanes) n = 1;
    const int64_t size = std::min(kMaxTreeChunk, (n + 1) / 2), chunks = n > 1 ? (n + size - 1) / size : n;
    for (int64_t c = 0, start = b; c < chunks; ++c) {
      const int64_t count = n > 1 ? (n - (start - b)) / (chunks - c) : 1;  // the rest, shared evenly
      for (int64_t h = 0; h < p.kv_heads; ++h) units.push_back({start, count, h});
      start += count;
    }
    b += n;
  }
  return units;
}

template <int64_t kC, typename T>
void attend_unit(const Problem<T>& p, const Unit& u, Scratch<T>& w) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && (kC == 4 || kC == 8)) {
    if (u.count > 1) {
      switch (p.heads / p.kv_heads) {
        case 1: return attend_tree_bf16<kC, 1>(p, u.b, u.count, u.h, w);
        case 2: return attend_tree_bf16<kC, 2>(p, u.b, u.count, u.h, w);
        case 3: return attend_tree_bf16<kC, 3>(p, u.b, u.count, u.h, w);
        case 4: return attend_tree_bf16<kC, 4>(p, u.b, u.count, u.h, w);
      }
    }
  }
#endif
  for (int64_t b = u.b; b < u.b + u.count; ++b) attend<kC>(p, b, u.h, w);
}

template <int64_t kC, typename T>
void run(const Problem<T>& p, int num_threads) {
  const std::vector<Unit> units = plan_units<kC>(p);
  const int64_t n = static_cast<int64_t>(units.size());
#pragma omp parallel num_threads(num_threads)
  {
    Scratch<T> w(p.heads / p.kv_heads, p.head_dim);
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < n; ++i) attend_unit<kC>(p, units[i], w);
  }
}

// Common head dims get their loops over D unrolled and accumulators kept in registers; other
// multiples of kLanes run the same code with a runtime D.
template <typename T>
void dispatch(const Problem<T>& p, int num_threads) {
  switch (p.head_dim) {
    case 64: return run<64 / kLanes>(p, num_threads);
    case 128: return run<128 / kLanes>(p, num_threads);
    default: return run<0>(p, num_threads);
  }
}

template <typename T>
Problem<T> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                   const at::Tensor& seq_lens, const std::optional<at::Tensor>& extra,
                   const std::optional<at::Tensor>& extra_lens, double scale, at::Tensor& out) {
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
          k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
          tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
          extra ? extra->data_ptr<int64_t>() : nullptr, extra_lens ? extra_lens->data_ptr<int64_t>() : nullptr,
          extra ? extra->size(1) : 0, out.data_ptr<T>(),
          q.size(0), q.size(1), k.size(2), q.size(2), k.size(1), tables.size(1), static_cast<float>(scale)};
}

// Trailing slots of each query must lie in the cache.
void check_extra(const at::Tensor& extra, const at::Tensor& extra_lens, int64_t num_slots) {
  const int64_t* ep = extra.data_ptr<int64_t>();
  const int64_t* lp = extra_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < extra.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= extra.size(1), "extra_lens[", b, "] = ", lp[b], " is out of range");
    for (int64_t i = 0; i < lp[b]; ++i) {
      TORCH_CHECK(ep[b * extra.size(1) + i] >= 0 && ep[b * extra.size(1) + i] < num_slots,
                  "extra slot ", ep[b * extra.size(1) + i], " is outside the cache");
    }
  }
}

// Every block a request will read must lie in the cache: a bad table would read out of bounds.
void check_tables(const at::Tensor& tables, const at::Tensor& seq_lens, int64_t num_blocks, int64_t bs) {
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  for (int64_t b = 0; b < tables.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= max_blocks * bs, "seq_lens[", b, "] = ", lp[b],
                " does not fit the block table (", max_blocks, " blocks of ", bs, ")");
    for (int64_t i = 0; i < (lp[b] + bs - 1) / bs; ++i) {
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < num_blocks,
                  "block_tables[", b, ", ", i, "] = ", tp[b * max_blocks + i], " is outside the cache");
    }
  }
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens_in, double scale,
                                  const std::optional<at::Tensor>& extra_in,
                                  const std::optional<at::Tensor>& extra_lens_in) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [B, H, D] and k/v caches [num_blocks, block_size, KVH, D]");
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(q_in.scalar_type() == k_cache.scalar_type() && q_in.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "cache rows must be contiguous");
  TORCH_CHECK(q_in.size(2) == k_cache.size(3) && q_in.size(1) % k_cache.size(2) == 0,
              "head_dim must match and H must be a multiple of KVH");
  TORCH_CHECK(q_in.size(2) % kLanes == 0, "head_dim must be a multiple of ", kLanes, ", not ", q_in.size(2));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong &&
                  seq_lens_in.dim() == 1 && seq_lens_in.scalar_type() == at::kLong &&
                  block_tables.size(0) == q_in.size(0) && seq_lens_in.size(0) == q_in.size(0),
              "expected block_tables [B, max_blocks] and seq_lens [B], both int64");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  check_tables(tables, seq_lens, k_cache.size(0), k_cache.size(1));
  TORCH_CHECK(extra_in.has_value() == extra_lens_in.has_value(), "give both extra_slots and extra_lens, or neither");
  std::optional<at::Tensor> extra, extra_lens;
  if (extra_in) {
    TORCH_CHECK(extra_in->dim() == 2 && extra_in->size(0) == q_in.size(0) && extra_in->scalar_type() == at::kLong &&
                    extra_lens_in->dim() == 1 && extra_lens_in->size(0) == q_in.size(0) &&
                    extra_lens_in->scalar_type() == at::kLong,
                "expected extra_slots [B, E] and extra_lens [B], both int64");
    extra = extra_in->contiguous();
    extra_lens = extra_lens_in->contiguous();
    check_extra(*extra, *extra_lens, k_cache.size(0) * k_cache.size(1));
  }
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch(problem<float>(q, k_cache, v_cache, tables, seq_lens, extra, extra_lens, scale, out), at::get_num_threads());
  } else if (q.scalar_type() == at::kBFloat16) {
    const auto p = problem<at::BFloat16>(q, k_cache, v_cache, tables, seq_lens, extra, extra_lens, scale, out);
    if (!paged_attention_amx(p, at::get_num_threads())) dispatch(p, at::get_num_threads());
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, not ", q.scalar_type());
  }
  return out;
}

}  // namespace paraserve
