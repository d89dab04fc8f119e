// Paged decode attention on AMX tiles: the path paged_decode_attention takes for bfloat16 when
// the CPU has AMX and head_dim is a multiple of 32 up to 128 (see paged_attention.cpp).
//
// Why: a draft tree of n nodes is n queries over one context. The vector path scores each
// (query, head) against each key on its own, so a 12-node tree's attention cost 6.6x a decoded
// token's at 200 tokens of context and 8x at 500. Here a tree's queries share every 32-key chunk
// of their context: one tile product scores 16 (query, head) rows against 16 keys.
//
// Exactness: a row's numbers depend only on its query and the keys of its chunks, not on the
// rows sharing its tiles (a tile product is row-independent; the softmax runs row by row). Keys
// are cut into chunks of 32 by position, and every chunk goes through the one chunk() function
// whether a tree shares it or one query reads it alone. So a tree node on the accepted path
// attends bit-identically to decoding its token, as on the vector path; the two paths differ
// from each other in rounding, which is why a process uses one of them for every query.
//
// Walk: phase 1 takes each group of queries that share a block table and context length (a
// tree's nodes; a lone decode query is a group of one), 16 (query, head) rows at a time, through
// the chunks wholly inside the context. Phase 2 takes each query alone (its G heads) through its
// remaining keys: the context's last partial chunk and its own extra slots (its ancestors).
#include "amx.h"
#include "ops.h"
#include "paged_attention.h"
#include "vec.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace paraserve {

namespace {
std::atomic<bool> amx_attention_on{true};
}  // namespace

bool set_amx_attention(bool on) { return amx_attention_on.exchange(on); }

#if defined(PARASERVE_AMX)
namespace {

using attention::Problem;
using bf16 = at::BFloat16;

constexpr int64_t kChunk = 32;  // keys per chunk: the K dimension of one P . V tile product
constexpr int64_t kRows = 16;  // (query, head) rows per tile
constexpr int64_t kMaxD = 128;

// Every tile is 16 rows x 64 bytes: 0, 1 = scores of the chunk's keys 0-15 and 16-31; 2 = 32
// dims of the Q rows; 3, 4 = the K^T pair tiles of those dims for either key half; 5 = P;
// 6 = 16 dims of the output accumulator; 7 = the V pair tile of those dims.
void configure_tiles() {
  amx::TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// A chunk's keys and values in the pair layout tile products read. kt[half][db]: row r holds
// dims 32 db + 2r and + 1 of keys 16 half + n, n = 0..15 (K transposed); vv[c]: row r holds keys
// 2r and 2r + 1 of dims 16 c + n. Keys past the chunk's valid count are zero.
struct alignas(64) ChunkTiles {
  uint32_t kt[2][kMaxD / 32][16][16];
  uint32_t vv[kMaxD / 16][16][16];
};

// 16 (query, head) rows: queries, output accumulators and online softmax (running max m and sum
// l), and the current chunk's scores and probabilities. Rows past the used ones stay zero.
struct alignas(64) Rows {
  float o[kRows][kMaxD];
  float s[kRows][kChunk];
  bf16 q[kRows][kMaxD];
  bf16 p[kRows][kChunk];
  float m[kRows], l[kRows];

  void reset() {
    std::memset(o, 0, sizeof o);
    std::memset(q, 0, sizeof q);
    std::memset(p, 0, sizeof p);
    std::fill(m, m + kRows, -std::numeric_limits<float>::infinity());
    std::fill(l, l + kRows, 0.0f);
  }
};

// dst[r] = word r of each of the 16 rows (a 16 x 16 transpose of 32-bit words), in three rounds
// of interleaves: 32-bit pairs, 64-bit pairs, then 128-bit lanes.
void transpose16(const __m512i* r, uint32_t (*dst)[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + j], 128-bit lane L: rows 4k..4k+3 of column 4L + j
    u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i lo01 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), lo23 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i hi01 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    _mm512_store_si512(dst[j], _mm512_shuffle_i32x4(lo01, hi01, 0x88));
    _mm512_store_si512(dst[4 + j], _mm512_shuffle_i32x4(lo01, hi01, 0xDD));
    _mm512_store_si512(dst[8 + j], _mm512_shuffle_i32x4(lo23, hi23, 0x88));
    _mm512_store_si512(dst[12 + j], _mm512_shuffle_i32x4(lo23, hi23, 0xDD));
  }
}

// The tiles of keys [t0, t0 + n) of query b, KV head h (n <= kChunk).
void build_tiles(const Problem<bf16>& p, int64_t b, int64_t h, int64_t t0, int64_t n, ChunkTiles& t) {
  const bf16* krows[kChunk];
  const bf16* vrows[kChunk];
  attention::row_pointers(p, b, h, t0, n, krows, vrows);
  const int64_t D = p.head_dim;
  const __m512i zero = _mm512_setzero_si512();
  for (int half = 0; half < 2; ++half) {
    for (int64_t db = 0; db < D / 32; ++db) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t key = half * 16 + i;
        r[i] = key < n ? _mm512_loadu_si512(krows[key] + db * 32) : zero;
      }
      transpose16(r, t.kt[half][db]);
    }
  }
  // element 2i = row a's dim i, 2i + 1 = row b's (as the vector path interleaves V)
  const __m512i interleave = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                              38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t c = 0; c < D / 16; ++c) {
    for (int64_t k = 0; k < 16; ++k) {
      auto half_row = [&](int64_t key) {
        return key < n ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrows[key] + c * 16)))
                       : zero;
      };
      _mm512_store_si512(t.vv[c][k], _mm512_permutex2var_epi16(half_row(2 * k), interleave, half_row(2 * k + 1)));
    }
  }
}

// One chunk of n keys (its tiles t) for the first `used` rows of r: scores, the online softmax
// update, and O += P V. Every chunk of every query goes through this one function (noinline:
// one compiled body, so one rounding).
__attribute__((noinline)) void chunk(Rows& r, const ChunkTiles& t, int64_t n, int64_t used, int64_t D, float scale) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t db = 0; db < D / 32; ++db) {
    _tile_loadd(2, &r.q[0][db * 32], kMaxD * sizeof(bf16));
    _tile_loadd(3, t.kt[0][db], 64);
    _tile_loadd(4, t.kt[1][db], 64);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, &r.s[0][0], kChunk * sizeof(float));
  _tile_stored(1, &r.s[0][16], kChunk * sizeof(float));
  const vec ninf = splat(-std::numeric_limits<float>::infinity());
  const vec_i32 lane = lane_index(Lanes{});
  for (int64_t i = 0; i < used; ++i) {
    vec s0 = load(&r.s[i][0]) * scale, s1 = load(&r.s[i][16]) * scale;
    if (n < kChunk) {
      s0 = lane < static_cast<int32_t>(n) ? s0 : ninf;
      s1 = lane + 16 < static_cast<int32_t>(n) ? s1 : ninf;
    }
    const float m = r.m[i], new_m = std::max(m, hmax(s0 > s1 ? s0 : s1));
    const float corr = new_m == m ? 1.0f : exp_nonpos(splat(m - new_m))[0];  // the max settles early
    const vec p0 = exp_nonpos(s0 - new_m), p1 = exp_nonpos(s1 - new_m);
    r.m[i] = new_m;
    r.l[i] = r.l[i] * corr + hsum(p0 + p1);
    if (corr != 1.0f) {
      for (int64_t c = 0; c < D; c += kLanes) store(&r.o[i][c], load(&r.o[i][c]) * corr);
    }
    // p rounded to bf16 for the product, as the vector path and flash attention on GPUs do
    _mm512_store_si512(r.p[i], (__m512i)_mm512_cvtne2ps_pbh((__m512)p1, (__m512)p0));
  }
  _tile_loadd(5, &r.p[0][0], kChunk * sizeof(bf16));
  for (int64_t c = 0; c < D / 16; ++c) {
    _tile_loadd(6, &r.o[0][c * 16], kMaxD * sizeof(float));
    _tile_loadd(7, t.vv[c], 64);
    _tile_dpbf16ps(6, 5, 7);
    _tile_stored(6, &r.o[0][c * 16], kMaxD * sizeof(float));
  }
}

// Request the K/V rows of the chunk at t0 (if any) while the one before it is in use.
void prefetch_chunk(const Problem<bf16>& p, int64_t b, int64_t h, int64_t t0, int64_t end) {
  for (int64_t t = t0; t < std::min(t0 + kChunk, end); t += kLanes) attention::prefetch_tile(p, b, h, t);
}

// Chunks [t0, end) of query b (its table, context and extra slots), KV head h, for r's rows.
void walk(const Problem<bf16>& p, int64_t b, int64_t h, int64_t t0, int64_t end, int64_t used, Rows& r,
          ChunkTiles& t) {
  prefetch_chunk(p, b, h, t0, end);
  for (; t0 < end; t0 += kChunk) {
    prefetch_chunk(p, b, h, t0 + kChunk, end);
    const int64_t n = std::min(kChunk, end - t0);
    build_tiles(p, b, h, t0, n, t);
    chunk(r, t, n, used, p.head_dim, p.scale);
  }
}

// Where a query's shared chunks end: the context rounded down to whole chunks.
int64_t shared_end(const Problem<bf16>& p, int64_t b) { return p.seq_lens[b] / kChunk * kChunk; }

// Queries b and b - 1 read the same context (a tree's nodes do): same length, same blocks.
bool same_context(const Problem<bf16>& p, int64_t b) {
  if (p.seq_lens[b] != p.seq_lens[b - 1]) return false;
  const int64_t blocks = (p.seq_lens[b] + p.block_size - 1) / p.block_size;
  const int64_t* t = p.tables + b * p.max_blocks;
  return std::equal(t, t + blocks, t - p.max_blocks);
}

struct State {  // every (query, head) row's online softmax between the phases
  std::vector<float> o, m, l;
};

// Phase 1 for rows [r0, r0 + used) of the group starting at query b0 (row = (b - b0) * G + g).
void shared_rows(const Problem<bf16>& p, int64_t b0, int64_t h, int64_t r0, int64_t used, Rows& r, ChunkTiles& t,
                 State& st) {
  const int64_t G = p.heads / p.kv_heads, D = p.head_dim;
  r.reset();
  for (int64_t i = 0; i < used; ++i) {
    const int64_t row = (b0 + (r0 + i) / G) * p.heads + h * G + (r0 + i) % G;
    std::memcpy(r.q[i], p.q + row * D, D * sizeof(bf16));
  }
  walk(p, b0, h, 0, shared_end(p, b0), used, r, t);
  for (int64_t i = 0; i < used; ++i) {
    const int64_t row = (b0 + (r0 + i) / G) * p.heads + h * G + (r0 + i) % G;
    std::memcpy(st.o.data() + row * D, r.o[i], D * sizeof(float));
    st.m[row] = r.m[i];
    st.l[row] = r.l[i];
  }
}

// Phase 2: query b's G heads of KV head h through the rest of its keys, then the output.
void own_rows(const Problem<bf16>& p, int64_t b, int64_t h, Rows& r, ChunkTiles& t, const State& st) {
  const int64_t G = p.heads / p.kv_heads, D = p.head_dim, row0 = b * p.heads + h * G;
  r.reset();
  for (int64_t g = 0; g < G; ++g) {
    std::memcpy(r.q[g], p.q + (row0 + g) * D, D * sizeof(bf16));
    std::memcpy(r.o[g], st.o.data() + (row0 + g) * D, D * sizeof(float));
    r.m[g] = st.m[row0 + g];
    r.l[g] = st.l[row0 + g];
  }
  const int64_t len = p.length(b);
  walk(p, b, h, shared_end(p, b), len, G, r, t);
  for (int64_t g = 0; g < G; ++g) {
    const float inv = len > 0 ? 1.0f / r.l[g] : 0.0f;  // an empty sequence attends to nothing
    for (int64_t c = 0; c < D; c += kLanes) store(p.out + (row0 + g) * D + c, load(&r.o[g][c]) * inv);
  }
}

}  // namespace

bool paged_attention_amx(const Problem<bf16>& p, int num_threads) {
  const int64_t G = p.heads / p.kv_heads;
  if (!amx_attention_on.load() || !amx_available() || p.head_dim % 32 != 0 || p.head_dim > kMaxD || G > kRows) {
    return false;
  }
  struct Item {
    int64_t b0, h, r0, used;
  };
  std::vector<Item> items;  // phase 1: 16 rows of one group and KV head each
  for (int64_t b0 = 0, b1; b0 < p.batch; b0 = b1) {
    for (b1 = b0 + 1; b1 < p.batch && same_context(p, b1);) ++b1;
    const int64_t rows = (b1 - b0) * G;
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) items.push_back({b0, h, r0, std::min(kRows, rows - r0)});
    }
  }
  State st{std::vector<float>(p.batch * p.heads * p.head_dim), std::vector<float>(p.batch * p.heads),
           std::vector<float>(p.batch * p.heads)};
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(num_threads)
  {
    configure_tiles();
    std::unique_ptr<Rows> r(new Rows);
    std::unique_ptr<ChunkTiles> t(new ChunkTiles);
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < n_items; ++i) shared_rows(p, items[i].b0, items[i].h, items[i].r0, items[i].used, *r, *t, st);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.kv_heads; ++h) own_rows(p, b, h, *r, *t, st);
    }
    _tile_release();
  }
  return true;
}
#else
bool paged_attention_amx(const attention::Problem<at::BFloat16>&, int) { return false; }
#endif

}  // namespace paraserve
