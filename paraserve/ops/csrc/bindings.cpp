#include <torch/extension.h>

#include "ops.h"
#include "vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace paraserve;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention,
        "paged decode attention (q, k_cache, v_cache, block_tables, seq_lens, scale, extra_slots=None, "
        "extra_lens=None) -> out",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("scale"), py::arg("extra_slots") = py::none(), py::arg("extra_lens") = py::none(), nogil);
  m.def("set_amx_attention", &set_amx_attention,
        "(on) -> the previous setting: bf16 paged attention on AMX tiles where the CPU has them");
  m.def("small_m_linear", &small_m_linear, "x @ w.T (+ bias) for a few rows of x", nogil);
  m.def("amx_available", &amx_available, "AMX tiles built in and granted by the OS");
  m.def("amx_pack_weight", &amx_pack_weight, "bf16 w [N, K] -> the tile layout amx_linear reads");
  m.def("amx_linear", &amx_linear, "(x, packed, bias or None) -> x @ w.T (+ bias) on AMX tiles", nogil);
  m.def("avx512_bf16_available", &avx512_bf16_available, "built with AVX-512 BF16 (bf16_panel_linear)");
  m.def("bf16_panel_linear", &bf16_panel_linear,
        "(x, amx_pack_weight(w), bias or None) -> x @ w.T (+ bias) on AVX-512 BF16 vectors", nogil);
  m.def("panel_linear", &panel_linear, "amx_linear where the CPU has AMX, else bf16_panel_linear", nogil);
  m.def("amx_pack_int8", &amx_pack_int8, "w [N, K] -> [int8 tile layout, per-row scale] for amx_int8_linear");
  m.def("amx_int8_linear", &amx_int8_linear,
        "(x bf16, packed, scale, bias or None) -> x @ w.T (+ bias), int8 weights and activations on AMX", nogil);
  m.def("vnni_int8_linear", &vnni_int8_linear, "amx_int8_linear's product on AVX-512 VNNI (the same bits)", nogil);
  m.def("vnni_int8_available", &vnni_int8_available, "built with AVX-512 VNNI (vnni_int8_linear)");
  m.def("int8_available", &int8_available, "int8_linear runs here: AMX tiles or AVX-512 VNNI");
  m.def("int8_linear", &int8_linear, "amx_int8_linear where the CPU has AMX, else vnni_int8_linear", nogil);
  m.def("rms_norm", &rms_norm, "(x, residual or None, weight, eps) -> normed; residual += x in place", nogil);
  m.def("rope_and_cache", &rope_and_cache,
        "(q, k, v, positions, cos, sin, kv_cache, slot_mapping): rotary in place, k/v into the cache", nogil);
  m.def("silu_and_mul", &silu_and_mul, "gate_up [T, 2I] -> silu(gate) * up", nogil);
  m.def("sample_rows", &sample_rows, "(probs [B, V], u [B]) -> inverse-CDF draw per row", nogil);
  m.def("argmax_rows", &argmax_rows, "first argmax of each row", nogil);
  m.def("logsumexp_rows", &logsumexp_rows, "log(sum(exp(row))) of each row, float32", nogil);
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"),
           py::arg("cos"), py::arg("sin"), py::arg("final_norm"))
      .def("add_layer", &DecoderStack::add_layer, py::arg("input_norm"), py::arg("qkv"), py::arg("o"),
           py::arg("post_norm"), py::arg("gate_up"), py::arg("down"), py::arg("q_norm"), py::arg("k_norm"),
           py::arg("kv_cache"))
      .def("forward", &DecoderStack::forward, py::arg("x"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("ctx_lens"), py::arg("extra_slots") = py::none(),
           py::arg("extra_lens") = py::none(), nogil)
      .def_property_readonly("num_layers", &DecoderStack::num_layers);
  py::class_<DraftHead>(m, "DraftHead")
      .def(py::init<at::Tensor, at::Tensor, const DraftHead::LinearArgs&, const DraftHead::LinearArgs&,
                    const std::optional<DraftHead::LinearArgs>&, const std::vector<DraftHead::LinearArgs>&,
                    const DraftHead::LinearArgs&, bool>(),
           py::arg("embed"), py::arg("token_ids"), py::arg("rnn_w"), py::arg("rnn_u"), py::arg("proj"),
           py::arg("blocks"), py::arg("lm_head"), py::arg("int8") = false)
      .def("beam_search", &DraftHead::beam_search, py::arg("h"), py::arg("last_tokens"), py::arg("width"),
           py::arg("length"), py::arg("min_logprob"), nogil);
  m.attr("HEAD_DIM_MULTIPLE") = kLanes;
}
