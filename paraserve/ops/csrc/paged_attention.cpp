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
// the same tiles, so verification reproduces decoding's numbers bit for bit.
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
void for_each_tile(const Problem<T>& p, int64_t b, int64_t h, int64_t len, Scratch<T>& w, F&& body) {
  prefetch_first_tiles(p, b, h, len);
  for (int64_t t0 = 0; t0 < len; t0 += kLanes) {
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
// bf16 with D = 16 * kC on vdpbf16ps (bf16 products are exact, sums float32; the scale applies to
// the sum). A tile's 16 K rows are transposed once into one vector per pair of dims (lane i: key
// i's pair), so a query head's 16 scores are D / 2 dot-steps against its broadcast pairs, with no
// horizontal sums; p . V runs on pairs of V rows interleaved once (one permute per 16 dims), p
// rounded to bf16 as flash attention does on GPUs. Both are shared by every query head that reads
// the tile: the G heads of a KV head and, for a draft tree, every node of the tree over its
// common context (the nodes differ only in their last, extra keys). Each head's numbers depend
// on its own q and keys alone, tile by tile, so a node gets what a decode at its position gets.
// Against one query at a time with per-key horizontal sums (SmolLM2's 9 heads on 3 KV heads, 2
// Zen 4 cores, ~290 tokens of context): a 10-node tree 62 -> 40 us a layer, a decode 13.8 -> 12.8.

// 16 x 16 transpose of 32-bit lanes: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4a + b] now holds, in 128-bit lane L, rows 4a..4a+3 of columns 4L + b (one per dword)
  for (int i = 0; i < 8; ++i) {  // pair 128-bit lanes: rows 4a.. with rows 4a+4.. (a even)
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
  }
}

template <int64_t kC>
struct HeadState {
  vec acc[kC];
  float m, l;
};

constexpr int64_t kTreeQueries = 8;  // the most queries one task runs over a shared context

// One tile of n <= kLanes keys (rows krows / vrows; rows past n repeat a valid one) for Q queries
// of G heads each: qp[q] points at query q's G heads (bf16 pairs), st[q * G + g] their state.
// Every head's sums run in the same order whatever Q is.
template <int64_t kC, int64_t G>
void tile_bf16(const uint32_t* const* qp, int64_t Q, const at::BFloat16* const* krows,
               const at::BFloat16* const* vrows, int64_t n, float scale, HeadState<kC>* st) {
  constexpr int64_t kPairs = kC * kLanes / 2;  // D / 2
  // scores: each 16 dims of the tile's K rows transposed (r[j] lane i: key i's pair j), then
  // every head's two chains (even and odd pairs) take them
  __m512 a[kTreeQueries][G][2];
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t g = 0; g < G; ++g) a[q][g][0] = a[q][g][1] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < kPairs / 16; ++c) {
    __m512i r[16];
    for (int64_t i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(krows[i] + c * 32);
    transpose16(r);
    for (int64_t q = 0; q < Q; ++q) {
      for (int64_t j = 0; j < 16; j += 2) {
        for (int64_t g = 0; g < G; ++g) {
          const uint32_t* qg = qp[q] + g * kPairs + c * 16;
          a[q][g][0] = _mm512_dpbf16_ps(a[q][g][0], (__m512bh)_mm512_set1_epi32(qg[j]), (__m512bh)r[j]);
          a[q][g][1] = _mm512_dpbf16_ps(a[q][g][1], (__m512bh)_mm512_set1_epi32(qg[j + 1]), (__m512bh)r[j + 1]);
        }
      }
    }
  }
  alignas(64) uint32_t pairs[kTreeQueries][G][kLanes / 2];  // each head's probabilities, bf16 pairs
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t g = 0; g < G; ++g) {
      vec sc = (vec)_mm512_add_ps(a[q][g][0], a[q][g][1]) * scale;
      sc = lane_index(Lanes{}) < static_cast<int32_t>(n) ? sc : splat(-std::numeric_limits<float>::infinity());
      HeadState<kC>& h = st[q * G + g];
      const vec probs = softmax_update(sc, h.m, h.l, h.acc, kC);  // masked lanes are exactly 0
      _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[q][g]), (__m256i)_mm512_cvtneps_pbh((__m512)probs));
    }
  }
  // p . V over pairs of rows interleaved: for one query straight from registers, for several
  // interleaved once into vi and read back per head
  const __m512i interleave = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                              38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  auto pair_rows = [&](int64_t k, int64_t c) {
    const at::BFloat16* v0 = vrows[2 * k];
    const at::BFloat16* v1 = vrows[2 * k + 1];  // past n: a valid row with p = 0
    return _mm512_permutex2var_epi16(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + c * 16))), interleave,
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + c * 16))));
  };
  if (Q == 1) {
    vec acc[G][kC];
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < kC; ++c) acc[g][c] = st[g].acc[c];
    }
    for (int64_t k = 0; k < (n + 1) / 2; ++k) {
      for (int64_t c = 0; c < kC; ++c) {
        const __m512i rows = pair_rows(k, c);
        for (int64_t g = 0; g < G; ++g) {
          acc[g][c] = (vec)_mm512_dpbf16_ps((__m512)acc[g][c], (__m512bh)_mm512_set1_epi32(pairs[0][g][k]),
                                            (__m512bh)rows);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < kC; ++c) st[g].acc[c] = acc[g][c];
    }
    return;
  }
  alignas(64) __m512i vi[kLanes / 2][kC];
  for (int64_t k = 0; k < (n + 1) / 2; ++k) {
    for (int64_t c = 0; c < kC; ++c) vi[k][c] = pair_rows(k, c);
  }
  for (int64_t q = 0; q < Q; ++q) {
    vec acc[G][kC];
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < kC; ++c) acc[g][c] = st[q * G + g].acc[c];
    }
    for (int64_t k = 0; k < (n + 1) / 2; ++k) {
      for (int64_t g = 0; g < G; ++g) {
        const __m512bh pk = (__m512bh)_mm512_set1_epi32(pairs[q][g][k]);
        for (int64_t c = 0; c < kC; ++c) acc[g][c] = (vec)_mm512_dpbf16_ps((__m512)acc[g][c], pk, (__m512bh)vi[k][c]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < kC; ++c) st[q * G + g].acc[c] = acc[g][c];
    }
  }
}

// Queries [b0, b1) (at most kTreeQueries) and KV head h; the queries read the same first
// `shared` tokens (whole tiles of one table), then each its own rest.
template <int64_t kC, int64_t G>
void attend_bf16(const Problem<at::BFloat16>& p, int64_t b0, int64_t b1, int64_t h, int64_t shared) {
  const int64_t Q = b1 - b0;
  HeadState<kC> st[kTreeQueries * G];
  const uint32_t* qp[kTreeQueries];
  for (int64_t q = 0; q < Q; ++q) {
    qp[q] = reinterpret_cast<const uint32_t*>(p.q + ((b0 + q) * p.heads + h * G) * p.head_dim);
    for (int64_t g = 0; g < G; ++g) {
      HeadState<kC>& s = st[q * G + g];
      for (int64_t c = 0; c < kC; ++c) s.acc[c] = vec{};
      s.m = -std::numeric_limits<float>::infinity();
      s.l = 0.0f;
    }
  }
  const at::BFloat16* krows[kLanes];
  const at::BFloat16* vrows[kLanes];
  prefetch_first_tiles(p, b0, h, shared);
  for (int64_t t0 = 0; t0 < shared; t0 += kLanes) {
    prefetch_ahead(p, b0, h, t0, shared);
    row_pointers(p, b0, h, t0, kLanes, krows, vrows);
    tile_bf16<kC, G>(qp, Q, krows, vrows, kLanes, p.scale, st);
  }
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t b = b0 + q, len = p.length(b);
    for (int64_t t0 = shared; t0 < len; t0 += kLanes) {
      const int64_t n = std::min(kLanes, len - t0);
      row_pointers(p, b, h, t0, n, krows, vrows);
      std::fill(krows + n, krows + kLanes, krows[0]);
      std::fill(vrows + n, vrows + kLanes, vrows[0]);
      tile_bf16<kC, G>(qp + q, 1, krows, vrows, n, p.scale, st + q * G);
    }
    for (int64_t g = 0; g < G; ++g) {
      const HeadState<kC>& s = st[q * G + g];
      const float inv = len > 0 ? 1.0f / s.l : 0.0f;
      for (int64_t c = 0; c < kC; ++c) store(p.out + (b * p.heads + h * G + g) * p.head_dim + c * kLanes, s.acc[c] * inv);
    }
  }
}

// The bf16 path for this head size and group over a task's queries, or false.
template <int64_t kC>
bool attend_bf16_dispatch(const Problem<at::BFloat16>& p, int64_t b0, int64_t b1, int64_t h, int64_t shared) {
  if constexpr (kC == 4 || kC == 8) {
    switch (p.heads / p.kv_heads) {
      case 1: attend_bf16<kC, 1>(p, b0, b1, h, shared); return true;
      case 2: attend_bf16<kC, 2>(p, b0, b1, h, shared); return true;
      case 3: attend_bf16<kC, 3>(p, b0, b1, h, shared); return true;
      case 4: attend_bf16<kC, 4>(p, b0, b1, h, shared); return true;
      default: return false;
    }
  }
  return false;
}

template <int64_t kC>
constexpr bool bf16_path() { return kC == 4 || kC == 8; }
#endif

// Tasks of the bf16 path: runs of consecutive queries with the same context (length and table:
// a draft tree's nodes), at most kTreeQueries each and split evenly, and the context's whole
// tiles they share; a query alone shares nothing it does not read itself.
struct Task {
  int64_t b0, b1, shared;
};

template <typename T>
std::vector<Task> tasks(const Problem<T>& p, int64_t max_queries) {
  std::vector<Task> out;
  auto same_context = [&](int64_t a, int64_t b) {
    if (p.seq_lens[a] != p.seq_lens[b]) return false;
    const int64_t blocks = (p.seq_lens[a] + p.block_size - 1) / p.block_size;
    return std::equal(p.tables + a * p.max_blocks, p.tables + a * p.max_blocks + blocks, p.tables + b * p.max_blocks);
  };
  for (int64_t b0 = 0; b0 < p.batch;) {
    int64_t b1 = b0 + 1;
    while (b1 < p.batch && same_context(b0, b1)) ++b1;
    const int64_t parts = (b1 - b0 + max_queries - 1) / max_queries, shared = p.seq_lens[b0] / kLanes * kLanes;
    for (int64_t k = 0; k < parts; ++k) {
      out.push_back({b0 + (b1 - b0) * k / parts, b0 + (b1 - b0) * (k + 1) / parts, shared});
    }
    b0 = b1;
  }
  return out;
}

// One query b, one KV head h: its G query heads attend over the query's tokens.
template <int64_t kC, typename T>
void attend(const Problem<T>& p, int64_t b, int64_t h, Scratch<T>& w) {
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

template <int64_t kC, typename T>
void run(const Problem<T>& p, int num_threads) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && bf16_path<kC>()) {
    const int64_t g = p.heads / p.kv_heads;
    if (g >= 1 && g <= 4) {
      // a tree's nodes in tasks of up to 5 (10 nodes and 3 KV heads: 6 tasks for 2 threads)
      const std::vector<Task> work = tasks(p, p.extra ? 5 : 1);
      const int64_t n = static_cast<int64_t>(work.size());
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < p.kv_heads; ++h) attend_bf16_dispatch<kC>(p, work[i].b0, work[i].b1, h, work[i].shared);
      }
      return;
    }
  }
#endif
#pragma omp parallel num_threads(num_threads)
  {
    Scratch<T> w(p.heads / p.kv_heads, p.head_dim);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.kv_heads; ++h) attend<kC>(p, b, h, w);
    }
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
