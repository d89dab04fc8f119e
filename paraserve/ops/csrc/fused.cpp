// The elementwise parts of a decoder layer, each fused into one pass: on a decode step every
// torch op costs a few microseconds of dispatch whatever its size, and a layer's norms, rotary
// and SiLU took ~40 of them. Each kernel rounds where the torch reference rounds (same float32
// operations in the same order, no FMA contraction), so results match the reference bit for
// bit except where a reduction sums in another order.
#pragma GCC optimize("fp-contract=off")

#include "ops.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace paraserve {
namespace {

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// Rows per thread before a norm splits over threads: forking costs more than a few rows' work
// (8 rows of SmolLM2's 576: 2.0 us on two threads of a Zen 4, 0.6 us on one). Rows are
// independent, so the split never changes a result.
constexpr int64_t kNormSplitElems = 16384;

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, T* res, int64_t res_stride, const T* w, T* out, int64_t rows,
                   int64_t h, float eps) {
  const T* tag = nullptr;  // selects round_as for T
  const int64_t grain = std::max<int64_t>(1, kNormSplitElems / std::max<int64_t>(h, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * x_stride;
      const T* src = xr;
      if (res != nullptr) {  // residual += x, rounded to T as `x + residual` is
        T* rr = res + r * res_stride;
        int64_t i = 0;
        for (; i + kLanes <= h; i += kLanes) store(rr + i, load(xr + i) + load(rr + i));
        for (; i < h; ++i) rr[i] = round_to<T>(f32(xr[i]) + f32(rr[i]));
        src = rr;
      }
      vec ssv = {};
      int64_t i = 0;
      for (; i + kLanes <= h; i += kLanes) ssv += load(src + i) * load(src + i);
      float ss = hsum(ssv);
      for (; i < h; ++i) ss += f32(src[i]) * f32(src[i]);
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
      T* o = out + r * h;
      for (i = 0; i + kLanes <= h; i += kLanes) store(o + i, load(w + i) * round_as(tag, load(src + i) * inv));
      for (; i < h; ++i) o[i] = round_to<T>(f32(w[i]) * f32(round_to<T>(f32(src[i]) * inv)));
    }
  });
}

// One head of D values at p, neox layout: the halves [0, D/2) and [D/2, D) rotate as pairs.
template <typename T>
inline void rotate(T* p, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
  for (; i + kLanes <= half; i += kLanes) {
    const vec x1 = load(p + i), x2 = load(p + i + half), cv = load(c + i), sv = load(s + i);
    store(p + i, x1 * cv - x2 * sv);
    store(p + i + half, x2 * cv + x1 * sv);
  }
  for (; i < half; ++i) {
    const float x1 = f32(p[i]), x2 = f32(p[i + half]);
    p[i] = round_to<T>(x1 * c[i] - x2 * s[i]);
    p[i + half] = round_to<T>(x2 * c[i] + x1 * s[i]);
  }
}

template <typename T>
void rope_cache_rows(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const int64_t* pos, const float* cos,
                     const float* sin, T* cache, int64_t cache_half, const int64_t* slots) {
  const int64_t tokens = q.size(0), h = q.size(1), kvh = k.size(1), d = q.size(2), half = d / 2;
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  at::parallel_for(0, tokens, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cos + pos[t] * half;
      const float* s = sin + pos[t] * half;
      for (int64_t j = 0; j < h; ++j) rotate(qp + t * qs0 + j * qs1, c, s, half);
      T* kc = cache + slots[t] * kvh * d;
      T* vc = kc + cache_half;
      for (int64_t j = 0; j < kvh; ++j) {
        T* kr = kp + t * ks0 + j * ks1;
        rotate(kr, c, s, half);
        std::memcpy(kc + j * d, kr, d * sizeof(T));
        std::memcpy(vc + j * d, vp + t * vs0 + j * vs1, d * sizeof(T));
      }
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gu, int64_t stride, T* out, int64_t rows, int64_t inter) {
  const T* tag = nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * stride;
      const T* u = g + inter;
      T* o = out + r * inter;
      int64_t i = 0;
      for (; i + kLanes <= inter; i += kLanes) store(o + i, round_as(tag, silu(load(g + i))) * load(u + i));
      for (; i < inter; ++i) o[i] = round_to<T>(f32(round_to<T>(silu(f32(g[i])))) * f32(u[i]));
    }
  });
}

// The first index of row's maximum, NaN ranking highest (as torch.argmax): a vector pass for
// the maximum (and whether a NaN is present) on four independent accumulators (one chain of
// compare-and-blend was latency-bound), then one for its first index, testing a whole vector at
// once (10 rows of 49k bf16 logits on 2 Zen 4 cores: 72 -> 34 us); a scalar walk only for rows
// holding a NaN.
template <typename T>
int64_t argmax_row(const T* row, int64_t cols) {
  constexpr int64_t kAcc = 4;
  vec mv[kAcc];
  vec_i32 nan[kAcc] = {};
  for (int64_t a = 0; a < kAcc; ++a) mv[a] = splat(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kAcc * kLanes <= cols; i += kAcc * kLanes) {
    for (int64_t a = 0; a < kAcc; ++a) {
      const vec v = load(row + i + a * kLanes);
      mv[a] = v > mv[a] ? v : mv[a];
      nan[a] |= v != v;
    }
  }
  for (; i + kLanes <= cols; i += kLanes) {
    const vec v = load(row + i);
    mv[0] = v > mv[0] ? v : mv[0];
    nan[0] |= v != v;
  }
  for (int64_t a = 1; a < kAcc; ++a) {
    mv[0] = mv[a] > mv[0] ? mv[a] : mv[0];
    nan[0] |= nan[a];
  }
  float m = hmax(mv[0]);
  bool any_nan = false;
  for (int64_t j = 0; j < kLanes; ++j) any_nan |= nan[0][j] != 0;
  for (int64_t j = i; j < cols; ++j) {
    const float v = f32(row[j]);
    any_nan |= v != v;
    m = std::max(m, v);
  }
  if (any_nan) {
    for (int64_t j = 0; j < cols; ++j) {
      if (f32(row[j]) != f32(row[j])) return j;
    }
  }
  for (i = 0; i + kLanes <= cols; i += kLanes) {
    const int64_t lane = first_set_lane(load(row + i) == m);
    if (lane >= 0) return i + lane;
  }
  for (; i < cols; ++i) {
    if (f32(row[i]) == m) return i;
  }
  return 0;  // every entry -inf: the first
}

template <typename T>
void argmax_rows_impl(const T* x, int64_t stride, int64_t rows, int64_t cols, int64_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) out[r] = argmax_row(x + r * stride, cols);
  });
}

// Inverse-CDF draw per row: the first index whose running sum of p exceeds u * sum(p). The scan
// adds a vector's worth at a time and steps token by token only inside the vector that crosses,
// so a row costs about one pass over half its vocabulary. A crossing token always has p > 0; if
// rounding leaves the scan short of the target, the last token with p > 0 is taken.
void sample_rows_impl(const float* p, int64_t stride, int64_t rows, int64_t cols, const float* u, int64_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = p + r * stride;
      vec total_v = {};
      int64_t i = 0;
      for (; i + kLanes <= cols; i += kLanes) total_v += load(row + i);
      float total = hsum(total_v);
      for (; i < cols; ++i) total += row[i];
      const float target = u[r] * total;
      float acc = 0.0f;
      int64_t pick = -1;
      for (i = 0; i < cols && pick < 0; i += kLanes) {
        const int64_t n = std::min(kLanes, cols - i);
        const float s = n == kLanes ? hsum(load(row + i)) : 0.0f;
        if (n == kLanes && acc + s <= target) {
          acc += s;
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          acc += row[i + j];
          if (acc > target && row[i + j] > 0.0f) {
            pick = i + j;
            break;
          }
        }
      }
      for (int64_t j = cols - 1; pick < 0 && j >= 0; --j) {
        if (row[j] > 0.0f) pick = j;
      }
      out[r] = pick < 0 ? 0 : pick;
    }
  });
}

// log(sum(exp(row))) per row, in two passes over the row (its max, then the shifted sum):
// torch's logsumexp on a bf16 row first writes a float32 copy, then makes more passes.
template <typename T>
void logsumexp_rows_impl(const T* x, int64_t stride, int64_t rows, int64_t cols, float* out) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * stride;
      vec mv = splat(-std::numeric_limits<float>::infinity());
      int64_t i = 0;
      for (; i + kLanes <= cols; i += kLanes) {
        const vec v = load(row + i);
        mv = v > mv ? v : mv;
      }
      float m = hmax(mv);
      for (; i < cols; ++i) m = std::max(m, f32(row[i]));
      if (!std::isfinite(m)) {  // all -inf (or a +inf / NaN): torch's answer for those
        out[r] = m;
        continue;
      }
      vec sv = {};
      for (i = 0; i + kLanes <= cols; i += kLanes) sv += exp_nonpos(load(row + i) - m);
      float sum = hsum(sv);
      for (; i < cols; ++i) sum += std::exp(f32(row[i]) - m);
      out[r] = m + std::log(sum);
    }
  });
}

template <typename F>
void by_dtype(const at::Tensor& t, const char* what, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else if (t.scalar_type() == at::kBFloat16) {
    f(at::BFloat16{});
  } else {
    TORCH_CHECK(false, what, " supports float32 and bfloat16, not ", t.scalar_type());
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), "rms_norm expects x [T, H] on CPU, rows contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [H] in x's dtype");
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 && residual->scalar_type() == x.scalar_type(),
                "residual must be [T, H] like x, rows contiguous");
  }
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  by_dtype(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), residual ? residual->data_ptr<T>() : nullptr,
                     residual ? residual->stride(0) : 0, w.data_ptr<T>(), out.data_ptr<T>(), x.size(0), x.size(1),
                     static_cast<float>(eps));
  });
  return out;
}

void rope_and_cache(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "expected q [T, H, D], k and v [T, KVH, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && q.size(2) % 2 == 0,
              "head rows must be contiguous and head_dim even");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous() &&
                  kv_cache.size(3) == k.size(1) && kv_cache.size(4) == k.size(2),
              "expected a contiguous kv_cache [2, num_blocks, block_size, KVH, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  v.scalar_type() == kv_cache.scalar_type(), "q, k, v and kv_cache must share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(1) == q.size(2) / 2,
              "cos/sin must be contiguous float32 [max_positions, D / 2]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  positions.numel() == q.size(0) && slot_mapping.numel() == q.size(0),
              "positions and slot_mapping must be int64 [T]");
  const at::Tensor pos = positions.contiguous(), slots = slot_mapping.contiguous();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "position ", pp[t], " is outside the rotary table");
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot ", sp[t], " is outside the KV cache");
  }
  by_dtype(q, "rope_and_cache", [&](auto tag) {
    using T = decltype(tag);
    rope_cache_rows<T>(q, k, v, pp, cos.data_ptr<float>(), sin.data_ptr<float>(), kv_cache.data_ptr<T>(),
                       kv_cache.stride(0), sp);
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1 && gate_up.device().is_cpu(),
              "silu_and_mul expects gate_up [T, 2I] on CPU, rows contiguous");
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), inter}, gate_up.options());
  by_dtype(gate_up, "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(gate_up.data_ptr<T>(), gate_up.stride(0), out.data_ptr<T>(), gate_up.size(0), inter);
  });
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1 && x.device().is_cpu(),
              "argmax_rows expects x [B, V] on CPU, rows contiguous");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  by_dtype(x, "argmax_rows", [&](auto tag) {
    using T = decltype(tag);
    argmax_rows_impl<T>(x.data_ptr<T>(), x.stride(0), x.size(0), x.size(1), out.data_ptr<int64_t>());
  });
  return out;
}

at::Tensor sample_rows(const at::Tensor& probs, const at::Tensor& u) {
  TORCH_CHECK(probs.dim() == 2 && probs.size(1) > 0 && probs.stride(1) == 1 && probs.device().is_cpu() &&
                  probs.scalar_type() == at::kFloat,
              "sample_rows expects float32 probs [B, V] on CPU, rows contiguous");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == probs.size(0) && u.scalar_type() == at::kFloat,
              "sample_rows expects float32 u [B]");
  const at::Tensor uc = u.contiguous();
  at::Tensor out = at::empty({probs.size(0)}, probs.options().dtype(at::kLong));
  sample_rows_impl(probs.data_ptr<float>(), probs.stride(0), probs.size(0), probs.size(1), uc.data_ptr<float>(),
                   out.data_ptr<int64_t>());
  return out;
}

at::Tensor logsumexp_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1 && x.device().is_cpu(),
              "logsumexp_rows expects x [B, V] on CPU, rows contiguous");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  by_dtype(x, "logsumexp_rows", [&](auto tag) {
    using T = decltype(tag);
    logsumexp_rows_impl<T>(x.data_ptr<T>(), x.stride(0), x.size(0), x.size(1), out.data_ptr<float>());
  });
  return out;
}

}  // namespace paraserve
