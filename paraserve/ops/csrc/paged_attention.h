// What the paged decode attention kernels share (paged_attention.cpp, its vector path, and
// paged_attention_amx.cpp, its AMX path): the problem as raw pointers and the walk of a query's
// K/V rows through its block table and its extra slots.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace paraserve {
namespace attention {

constexpr int64_t kPrefetchTiles = 2;  // tiles of K/V rows requested ahead of the one in use

// The problem as raw pointers and sizes; strides in elements.
template <typename T>
struct Problem {
  const T* q;  // [B, H, D] contiguous
  const T* k;  // [num_blocks, block_size, KVH, D]
  const T* v;
  int64_t k_blk, k_row, k_head, v_blk, v_row, v_head;
  const int64_t* tables;  // [B, max_blocks] contiguous
  const int64_t* seq_lens;  // [B] tokens read through the block table
  const int64_t* extra;  // [B, extra_stride] slots read after them, or nullptr
  const int64_t* extra_lens;  // [B], or nullptr
  int64_t extra_stride;
  T* out;  // [B, H, D] contiguous
  int64_t batch, heads, kv_heads, head_dim, block_size, max_blocks;
  float scale;

  int64_t length(int64_t b) const { return seq_lens[b] + (extra_lens ? extra_lens[b] : 0); }
  // The cache slot of query b's token t past its context (t >= seq_lens[b]): an extra slot.
  int64_t extra_slot(int64_t b, int64_t t) const { return extra[b * extra_stride + t - seq_lens[b]]; }
};

// K and V row pointers of tokens [t0, t0 + n) of query b, KV head h. Tokens before the context
// length walk the block table (one division per call, then block by block: a division per row
// cost more than scoring it); extra slots are looked up one by one.
template <typename T>
void row_pointers(const Problem<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n, const T** krows,
                  const T** vrows) {
  const int64_t ctx = p.seq_lens[b];
  int64_t i = 0;
  if (t0 < ctx) {
    const int64_t* table = p.tables + b * p.max_blocks;
    const int64_t end = std::min(n, ctx - t0);
    int64_t blk_i = t0 / p.block_size, off = t0 % p.block_size;
    while (i < end) {
      const T* kb = p.k + table[blk_i] * p.k_blk + h * p.k_head;
      const T* vb = p.v + table[blk_i] * p.v_blk + h * p.v_head;
      for (; i < end && off < p.block_size; ++i, ++off) {
        krows[i] = kb + off * p.k_row;
        vrows[i] = vb + off * p.v_row;
      }
      ++blk_i;
      off = 0;
    }
  }
  for (; i < n; ++i) {
    const int64_t slot = p.extra_slot(b, t0 + i);
    const int64_t blk = slot / p.block_size, off = slot % p.block_size;
    krows[i] = p.k + blk * p.k_blk + off * p.k_row + h * p.k_head;
    vrows[i] = p.v + blk * p.v_blk + off * p.v_row + h * p.v_head;
  }
}

// Prefetch the K and V rows of tokens [t0, t0 + kLanes) of query b, KV head h. Blocks sit
// anywhere in the cache, so the hardware prefetchers cannot follow a request's rows: without
// this a batch-64 step read K/V at ~6 GB/s, a quarter of the machine's bandwidth.
template <typename T>
void prefetch_tile(const Problem<T>& p, int64_t b, int64_t h, int64_t t0) {
  const int64_t n = std::min(kLanes, p.length(b) - t0);
  const int64_t bytes = p.head_dim * static_cast<int64_t>(sizeof(T));
  const T* krows[kLanes];
  const T* vrows[kLanes];
  row_pointers(p, b, h, t0, n, krows, vrows);
  for (int64_t i = 0; i < n; ++i) {
    const char* kr = reinterpret_cast<const char*>(krows[i]);
    const char* vr = reinterpret_cast<const char*>(vrows[i]);
    for (int64_t c = 0; c < bytes; c += 64) {
      __builtin_prefetch(kr + c, 0, 3);
      __builtin_prefetch(vr + c, 0, 3);
    }
  }
}

template <typename T>
void prefetch_first_tiles(const Problem<T>& p, int64_t b, int64_t h, int64_t len, int64_t first = 0) {
  for (int64_t t = first; t < first + kPrefetchTiles * kLanes && t < len; t += kLanes) prefetch_tile(p, b, h, t);
}

}  // namespace attention

// The AMX path (paged_attention_amx.cpp) for p: false, having done nothing, where it does not
// apply (no AMX, head_dim not a multiple of 32 up to 128, or turned off by set_amx_attention).
bool paged_attention_amx(const attention::Problem<at::BFloat16>& p, int num_threads);

}  // namespace paraserve
