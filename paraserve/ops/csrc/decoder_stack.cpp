// A Llama-family decoder run layer by layer in C++ for decode steps (every query a single decode
// token or a draft-tree node): what CUDA graphs are to a GPU decode step. Python dispatch around
// the ~10 kernels of a layer cost ~60 us per layer at batch 1 (1.9 ms of a 15 ms SmolLM2 token);
// here the same kernels run with the same arguments, so results are bit-identical to the module
// path (paraserve/models/decode_stack.py decides when a step may take this path).
#pragma GCC optimize("fp-contract=off")

#include "ops.h"

namespace paraserve {

at::Tensor DecoderStack::Linear::operator()(const at::Tensor& x) const {
  if (!int8.empty()) return int8_linear(x, int8[0], int8[1], bias);
  if (packed) return panel_linear(x, *packed, bias);
  return small_m_linear(x, weight, bias);
}

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
                           at::Tensor cos, at::Tensor sin, at::Tensor final_norm)
    : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
      cos_(std::move(cos)), sin_(std::move(sin)), final_norm_(std::move(final_norm)) {}

void DecoderStack::add_layer(const at::Tensor& input_norm, const LinearArgs& qkv, const LinearArgs& o,
                             const at::Tensor& post_norm, const LinearArgs& gate_up, const LinearArgs& down,
                             const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                             const at::Tensor& kv_cache) {
  auto linear = [](const LinearArgs& a) { return Linear{std::get<0>(a), std::get<1>(a), std::get<2>(a)}; };
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(), "kv_cache must be contiguous [2, blocks, block, KVH, D]");
  layers_.push_back(Layer{input_norm, linear(qkv), linear(o), post_norm, linear(gate_up), linear(down), q_norm,
                          k_norm, kv_cache});
}

// The torch reference RMSNorm (layers/layernorm.py) on [T, heads, D]: Qwen3's q/k norms.
static at::Tensor head_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, true) + eps);
  return weight * h.to(x.scalar_type());
}

at::Tensor DecoderStack::forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slot_mapping,
                                 const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                                 const std::optional<at::Tensor>& extra_slots,
                                 const std::optional<at::Tensor>& extra_lens) const {
  TORCH_CHECK(x.dim() == 2 && !layers_.empty(), "expected x [T, hidden] and at least one layer");
  const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
  at::Tensor residual = x, h;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    // layer 0 norms the embedding and keeps it as the residual; later layers add into it first
    at::Tensor y = i == 0 ? rms_norm(x, std::nullopt, l.input_norm, eps_) : rms_norm(h, residual, l.input_norm, eps_);
    at::Tensor qkv = l.qkv(y);  // [T, q_size + 2 kv_size]
    at::Tensor q = qkv.narrow(1, 0, q_size).view({-1, num_heads_, head_dim_});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({-1, num_kv_heads_, head_dim_});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({-1, num_kv_heads_, head_dim_});
    if (l.q_norm) {
      q = head_norm(q, *l.q_norm, eps_);
      k = head_norm(k, *l.k_norm, eps_);
    }
    at::Tensor cache = l.kv_cache;
    rope_and_cache(q, k, v, positions, cos_, sin_, cache, slot_mapping);
    at::Tensor attn = paged_decode_attention(q, cache[0], cache[1], block_tables, ctx_lens, scale_, extra_slots,
                                             extra_lens);  // [T, H, D]
    h = l.o.without_bias()(attn.flatten(1));
    if (l.o.bias) h = h + *l.o.bias;  // row-parallel layers add their bias after the all-reduce
    y = rms_norm(h, residual, l.post_norm, eps_);
    h = l.down.without_bias()(silu_and_mul(l.gate_up(y)));
    if (l.down.bias) h = h + *l.down.bias;
  }
  return rms_norm(h, residual, final_norm_, eps_);
}

}  // namespace paraserve
