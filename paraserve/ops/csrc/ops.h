// The CPU kernels bound in bindings.cpp. Every one checks its inputs and raises (TORCH_CHECK)
// rather than reading out of bounds; the Python wrappers in paraserve/ops/cpu.py decide when
// a kernel applies and fall back to plain torch otherwise.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace paraserve {

// q [B, H, D], k/v_cache [num_blocks, block_size, KVH, D], block_tables [B, max_blocks] int64,
// seq_lens [B] int64 -> [B, H, D]; float32 or bfloat16 (bf16 accumulates in float32). Query b
// reads seq_lens[b] tokens through its block table, then (when given) the extra_lens[b] flat
// cache slots extra_slots[b, :extra_lens[b]]: a tree node's ancestors.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  const std::optional<at::Tensor>& extra_slots,
                                  const std::optional<at::Tensor>& extra_lens);
// bf16 queries take AMX tiles where the CPU has them (paged_attention_amx.cpp), else the vector
// path; the two round differently. set_amx_attention(false) forces the vector path (tests);
// returns the previous setting.
bool set_amx_attention(bool on);

// x [M, K] @ w[N, K]^T (+ bias [N]) -> [M, N] for a few rows M: streams w once from memory.
at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// bf16 x [M, K] @ w[N, K]^T (+ bias [N]) on AMX tiles, w packed by amx_pack_weight (N and K
// multiples of 32). Each row's result is independent of M. amx_available(): this build and CPU
// have AMX and the OS granted the tile state.
bool amx_available();
at::Tensor amx_pack_weight(const at::Tensor& w);
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
// The same on AVX-512 BF16 vectors for CPUs without AMX (bf16_gemm.cpp), reading amx_pack_weight's
// layout; each row's result is independent of M here too. avx512_bf16_available(): built with it.
// panel_linear: amx_linear where the CPU has AMX, else bf16_panel_linear.
bool avx512_bf16_available();
at::Tensor bf16_panel_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
// The same with int8 weights and activations (int8_gemm.cpp; approximate, for the drafter only):
// amx_pack_int8(w [N, K], N % 32 == 0, K % 64 == 0) -> [packed, per-row scale float [N]], read
// by AMX tiles or, without AMX, AVX-512 VNNI (the same bits); int8_linear picks the one this CPU
// has, int8_available() says whether either is.
std::vector<at::Tensor> amx_pack_int8(const at::Tensor& w);
at::Tensor amx_int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias);
bool vnni_int8_available();
at::Tensor vnni_int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias);
inline bool int8_available() { return amx_available() || vnni_int8_available(); }

// With residual: residual += x in place, then returns rms_norm(residual) * weight; without,
// returns rms_norm(x) * weight. x, residual [T, H]; weight [H]. Rounds as the torch reference.
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps);

// Rotates q [T, H, D] and k [T, KVH, D] in place (neox halves, float32 cos/sin [max_pos, D / 2]
// at positions [T]) and writes k and v [T, KVH, D] into kv_cache [2, num_blocks, block_size, KVH, D]
// at slot_mapping [T].
void rope_and_cache(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                    const at::Tensor& slot_mapping);

// gate_up [T, 2I] -> silu(gate) * up [T, I].
at::Tensor silu_and_mul(const at::Tensor& gate_up);

// Row-wise argmax of x [B, V] (first index of the maximum) -> [B] int64, rows in parallel.
at::Tensor argmax_rows(const at::Tensor& x);
at::Tensor logsumexp_rows(const at::Tensor& x);  // float32 [B]

// One draw per row of probs [B, V] (unnormalised, >= 0) from uniforms u [B] in [0, 1):
// the first index whose running sum exceeds u * row sum (inverse CDF) -> [B] int64.
at::Tensor sample_rows(const at::Tensor& probs, const at::Tensor& u);

// A Llama-family decoder stack for decode steps (every query one decode token or one draft-tree
// node), layer after layer in C++ with the kernels above; decoder_stack.cpp.
class DecoderStack {
 public:
  // (weight [N, K], amx_pack_weight(weight) for panel_linear or None for small_m_linear, bias or None)
  using LinearArgs = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>;

  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale, at::Tensor cos,
               at::Tensor sin, at::Tensor final_norm);
  void add_layer(const at::Tensor& input_norm, const LinearArgs& qkv, const LinearArgs& o, const at::Tensor& post_norm,
                 const LinearArgs& gate_up, const LinearArgs& down, const std::optional<at::Tensor>& q_norm,
                 const std::optional<at::Tensor>& k_norm, const at::Tensor& kv_cache);
  // x [T, hidden] embedded tokens -> final-normed hidden [T, hidden]; the attention arguments are
  // paged_decode_attention's, one query per token in batch order.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                     const std::optional<at::Tensor>& extra_slots, const std::optional<at::Tensor>& extra_lens) const;
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // A linear layer on the CPU kernels: panel_linear with a packed weight, else small_m_linear;
  // int8_linear where int8 holds amx_pack_int8's [packed, scale] (drafter layers only).
  struct Linear {
    at::Tensor weight;
    std::optional<at::Tensor> packed, bias;
    std::vector<at::Tensor> int8 = {};
    at::Tensor operator()(const at::Tensor& x) const;
    Linear without_bias() const { return Linear{weight, packed, std::nullopt, int8}; }
  };

 private:
  struct Layer {
    at::Tensor input_norm;
    Linear qkv, o;
    at::Tensor post_norm;
    Linear gate_up, down;
    std::optional<at::Tensor> q_norm, k_norm;
    at::Tensor kv_cache;
  };
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  at::Tensor cos_, sin_, final_norm_;
  std::vector<Layer> layers_;
};

// A bf16 ReDrafter head (spec_decode/redrafter.py) on the base model's embedding table, and its
// beam search in one call (draft_head.cpp). Linear layers as DecoderStack takes them.
class DraftHead {
 public:
  using LinearArgs = DecoderStack::LinearArgs;
  // int8: every layer on amx_int8_linear (redrafter.compiled_head's drafter_int8)
  DraftHead(at::Tensor embed, at::Tensor token_ids, const LinearArgs& rnn_w, const LinearArgs& rnn_u,
            const std::optional<LinearArgs>& proj, const std::vector<LinearArgs>& blocks, const LinearArgs& lm_head,
            bool int8);
  // h [B, H], last_tokens [B] -> [final beams' base token ids [B, W, n], their per-token log-probs
  // [B, W, n], visited [B, n * W, n] (-1 padded), visited log-probs [B, n * W]]: redrafter.Beams.
  std::vector<at::Tensor> beam_search(const at::Tensor& h, const at::Tensor& last_tokens, int64_t width,
                                      int64_t length, double min_logprob) const;

 private:
  static DecoderStack::Linear linear(const LinearArgs& a, bool int8);
  at::Tensor logits(const at::Tensor& h, const at::Tensor& s) const;
  at::Tensor embed_, token_ids_;
  DecoderStack::Linear rnn_w_, rnn_u_, lm_head_;
  std::optional<DecoderStack::Linear> proj_;
  std::vector<DecoderStack::Linear> blocks_;
};

}  // namespace paraserve
