// ReDrafter's beam search (paraserve/spec_decode/redrafter.py, beam_search) in one call, for
// bf16 drafters on CPU. The Python search runs ~40 torch ops a step for 4-16 rows; at batch 1
// their dispatch, a topk over W x Vd candidates and a float32 log_softmax cost about as much as
// the drafter's own layers (2.4 ms a search, 1.1 of it outside the linear kernels). Here the
// layers run on the same linear kernels, each row's log-sum-exp and its W best tokens come
// from one pass over its logits, and the bookkeeping is on small arrays.
//
// Same search as the Python one: the W best of a beam's candidates are all a global top-W can
// take from it, so the top W of the W x W per-beam bests is the top W of all W x Vd. Scores may
// differ from torch's log_softmax in the last bits (another exp), so near-ties can pick other
// beams; verification does not depend on which drafts it gets.
#pragma GCC optimize("fp-contract=off")

#include "ops.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace paraserve {
namespace {

using bf16 = at::BFloat16;

// x + y, then silu, each rounded to bf16 as torch does in bf16 (y may be null: x alone).
at::Tensor silu_of_sum(const at::Tensor& x, const at::Tensor* y) {
  at::Tensor out = at::empty_like(x);
  const bf16* a = x.data_ptr<bf16>();
  const bf16* b = y ? y->data_ptr<bf16>() : nullptr;
  bf16* o = out.data_ptr<bf16>();
  const bf16* tag = nullptr;
  const int64_t n = x.numel();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vec v = b ? round_as(tag, load(a + i) + load(b + i)) : load(a + i);
    store(o + i, silu(v));
  }
  for (; i < n; ++i) {
    const float v = b ? static_cast<float>(static_cast<bf16>(static_cast<float>(a[i]) + static_cast<float>(b[i])))
                      : static_cast<float>(a[i]);
    o[i] = static_cast<bf16>(silu(v));
  }
  return out;
}

// x + silu(y) with bf16 rounding after each step (a residual block).
at::Tensor add_silu(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty_like(x);
  const bf16* a = x.data_ptr<bf16>();
  const bf16* b = y.data_ptr<bf16>();
  bf16* o = out.data_ptr<bf16>();
  const bf16* tag = nullptr;
  const int64_t n = x.numel();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(o + i, load(a + i) + round_as(tag, silu(load(b + i))));
  for (; i < n; ++i) {
    o[i] = static_cast<bf16>(static_cast<float>(a[i]) +
                             static_cast<float>(static_cast<bf16>(silu(static_cast<float>(b[i])))));
  }
  return out;
}

struct Cand {
  float score;
  int64_t index;
};

// Row r of logits [N, V]: its log-sum-exp, and its k largest entries (value, index), best first
// (ties: the lower index first).
float lse_and_top(const bf16* row, int64_t V, int64_t k, Cand* top) {
  vec mv = splat(-std::numeric_limits<float>::infinity());
  int64_t n = 0;  // entries in top
  float floor = -std::numeric_limits<float>::infinity();  // the k-th best so far, once n == k
  auto offer = [&](float v, int64_t i) {
    if (n == k && !(v > floor)) return;
    int64_t j = n < k ? n++ : k - 1;
    for (; j > 0 && top[j - 1].score < v; --j) top[j] = top[j - 1];
    top[j] = {v, i};
    if (n == k) floor = top[k - 1].score;
  };
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    const vec v = load(row + i);
    mv = v > mv ? v : mv;
    if (n < k || hmax(v) > floor) {
      for (int64_t j = 0; j < kLanes; ++j) offer(v[j], i + j);
    }
  }
  for (; i < V; ++i) offer(static_cast<float>(row[i]), i);
  float m = hmax(mv);
  for (int64_t j = V / kLanes * kLanes; j < V; ++j) m = std::max(m, static_cast<float>(row[j]));
  vec sv = {};
  for (i = 0; i + kLanes <= V; i += kLanes) sv += exp_nonpos(load(row + i) - m);
  float sum = hsum(sv);
  for (; i < V; ++i) sum += std::exp(static_cast<float>(row[i]) - m);
  return m + std::log(sum);
}

// The search's bookkeeping on small arrays: per request b and beam w (row b * W + w), the
// drafter-vocabulary rows and per-token log-probs so far ([B * W, L]) and the beam's log-prob;
// and every step's beams (the tree's candidate nodes).
struct Search {
  int64_t B, W, L;
  std::vector<int64_t> rows, new_rows;
  std::vector<float> lps, new_lps, score;
  std::vector<std::vector<int64_t>> visited_rows;  // step t: [B * W, t + 1]
  std::vector<std::vector<float>> visited_scores;  // step t: [B * W]

  Search(int64_t b, int64_t w, int64_t l)
      : B(b), W(w), L(l), rows(b * w * l), new_rows(b * w * l), lps(b * w * l), new_lps(b * w * l), score(b * w) {}

  // step 0: one row per request, its W best tokens (top[b * W ...], log-sum-exp lse[b])
  void start(const std::vector<Cand>& top, const std::vector<float>& lse) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t w = 0; w < W; ++w) {
        const Cand& c = top[b * W + w];
        rows[(b * W + w) * L] = c.index;
        score[b * W + w] = lps[(b * W + w) * L] = c.score - lse[b];
      }
    }
    record(0);
  }

  // step t: each request's W best of its beams' W best candidates (top[(b * W + w) * W ...]);
  // returns each new beam's parent row (for the recurrent state)
  std::vector<int64_t> advance(int64_t t, const std::vector<Cand>& top, const std::vector<float>& lse, int64_t Vd) {
    std::vector<int64_t> parent(B * W);
    std::vector<Cand> cand(W * W);  // score: the beam's + the token's log-prob; index: w * Vd + row
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t j = 0; j < W; ++j) {
          const Cand& c = top[(b * W + w) * W + j];
          cand[w * W + j] = {score[b * W + w] + (c.score - lse[b * W + w]), w * Vd + c.index};
        }
      }
      // ties to the earlier beam and row, as a stable sort of all W x Vd would order them
      std::stable_sort(cand.begin(), cand.end(), [](const Cand& x, const Cand& y) { return x.score > y.score; });
      for (int64_t w = 0; w < W; ++w) {
        const int64_t from = b * W + cand[w].index / Vd, to = b * W + w;
        parent[to] = from;
        std::copy_n(&rows[from * L], t, &new_rows[to * L]);
        std::copy_n(&lps[from * L], t, &new_lps[to * L]);
        new_rows[to * L + t] = cand[w].index % Vd;
        new_lps[to * L + t] = cand[w].score - score[from];
      }
      for (int64_t w = 0; w < W; ++w) score[b * W + w] = cand[w].score;
    }
    std::swap(rows, new_rows);
    std::swap(lps, new_lps);
    record(t);
    return parent;
  }

  void record(int64_t t) {
    visited_rows.emplace_back(B * W * (t + 1));
    for (int64_t i = 0; i < B * W; ++i) std::copy_n(&rows[i * L], t + 1, &visited_rows[t][i * (t + 1)]);
    visited_scores.push_back(score);
  }

  // Beams' tensors after n steps, rows mapped to base token ids: final ids [B, W, n], their
  // per-token log-probs [B, W, n], visited [B, n * W, n] (-1 past a beam's length), and the
  // visited beams' log-probs [B, n * W].
  std::vector<at::Tensor> tensors(const int64_t* ids) const {
    const int64_t n = static_cast<int64_t>(visited_rows.size());
    at::Tensor visited = at::full({B, n * W, n}, -1, at::kLong);
    at::Tensor visited_lp = at::empty({B, n * W}, at::kFloat);
    int64_t* vp = visited.data_ptr<int64_t>();
    float* vl = visited_lp.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < B * W; ++i) {  // i = b * W + w
        const int64_t entry = (i / W) * n * W + t * W + i % W;
        for (int64_t k = 0; k <= t; ++k) vp[entry * n + k] = ids[visited_rows[t][i * (t + 1) + k]];
        vl[entry] = visited_scores[t][i];
      }
    }
    at::Tensor final_lps = at::empty({B, W, n}, at::kFloat);
    float* fl = final_lps.data_ptr<float>();
    for (int64_t i = 0; i < B * W; ++i) std::copy_n(&lps[i * L], n, fl + i * n);
    return {visited.narrow(1, (n - 1) * W, W).clone(), final_lps, visited, visited_lp};
  }
};

// Each row r of logits [N, Vd]: its log-sum-exp, and its k best entries at top[r * k ...].
void rows_lse_and_top(const at::Tensor& logits, int64_t k, std::vector<float>& lse, std::vector<Cand>& top) {
  const int64_t N = logits.size(0), Vd = logits.size(1);
  const bf16* x = logits.data_ptr<bf16>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) lse[r] = lse_and_top(x + r * Vd, Vd, k, &top[r * k]);
  });
}

}  // namespace

DraftHead::DraftHead(at::Tensor embed, at::Tensor token_ids, const LinearArgs& rnn_w, const LinearArgs& rnn_u,
                     const std::optional<LinearArgs>& proj, const std::vector<LinearArgs>& blocks,
                     const LinearArgs& lm_head, bool int8)
    : embed_(std::move(embed)), token_ids_(token_ids.contiguous()), rnn_w_(linear(rnn_w, int8)),
      rnn_u_(linear(rnn_u, int8)), lm_head_(linear(lm_head, int8)) {
  TORCH_CHECK(embed_.dim() == 2 && embed_.scalar_type() == at::kBFloat16 && embed_.is_contiguous(),
              "DraftHead: embed must be a contiguous bf16 [V, H]");
  TORCH_CHECK(token_ids_.dim() == 1 && token_ids_.scalar_type() == at::kLong, "DraftHead: token_ids must be int64 [Vd]");
  if (proj) proj_ = linear(*proj, int8);
  for (const LinearArgs& b : blocks) blocks_.push_back(linear(b, int8));
}

DecoderStack::Linear DraftHead::linear(const LinearArgs& a, bool int8) {
  const at::Tensor& w = std::get<0>(a);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "DraftHead: weights must be bf16");
  TORCH_CHECK(!int8 || int8_available(), "DraftHead: int8 layers need AMX tiles or AVX-512 VNNI");
  return DecoderStack::Linear{w, std::get<1>(a), std::get<2>(a), int8 ? amx_pack_int8(w) : std::vector<at::Tensor>{}};
}

at::Tensor DraftHead::logits(const at::Tensor& h, const at::Tensor& s) const {
  at::Tensor x = at::cat({h, s}, 1);
  if (proj_) x = (*proj_)(x);
  for (const DecoderStack::Linear& block : blocks_) x = add_silu(x, block(x));
  return lm_head_(x);
}

std::vector<at::Tensor> DraftHead::beam_search(const at::Tensor& h_in, const at::Tensor& last_in, int64_t width,
                                               int64_t length, double min_logprob) const {
  const int64_t Vd = token_ids_.size(0), H = embed_.size(1);
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(1) == H && last_in.dim() == 1 && last_in.size(0) == h_in.size(0),
              "DraftHead.beam_search: expected h [B, H] and last_tokens [B]");
  TORCH_CHECK(width >= 1 && width <= Vd && length >= 1, "DraftHead.beam_search: need 1 <= width <= ", Vd,
              " and length >= 1");
  const at::Tensor h = h_in.to(at::kBFloat16).contiguous(), last = last_in.to(at::kLong).contiguous();
  const int64_t B = h.size(0), W = width, L = length;
  const int64_t* ids = token_ids_.data_ptr<int64_t>();
  Search search(B, W, L);
  std::vector<Cand> top(B * W * W);
  std::vector<float> lse(B * W);
  // step 0: one row per request (all beams start identical; s_0 = 0, so U s_0 drops out)
  at::Tensor s = silu_of_sum(rnn_w_(embed_.index_select(0, last)), nullptr);  // [B, H]
  rows_lse_and_top(logits(h, s), W, lse, top);  // top[b * W ...]: request b's W best
  search.start(top, lse);
  s = s.repeat_interleave(W, 0);  // [B * W, H]
  const at::Tensor h_w = h.repeat_interleave(W, 0);
  for (int64_t t = 1; t < L; ++t) {
    if (*std::max_element(search.score.begin(), search.score.end()) < min_logprob) break;
    std::vector<int64_t> prev(B * W);  // each beam's last token, as a base token id
    for (int64_t i = 0; i < B * W; ++i) prev[i] = ids[search.rows[i * L + t - 1]];
    const at::Tensor recurrent = rnn_u_(s);
    s = silu_of_sum(rnn_w_(embed_.index_select(0, at::tensor(prev, at::kLong))), &recurrent);
    rows_lse_and_top(logits(h_w, s), W, lse, top);
    s = s.index_select(0, at::tensor(search.advance(t, top, lse, Vd), at::kLong));
  }
  return search.tensors(ids);
}

}  // namespace paraserve
