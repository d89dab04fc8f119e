"""GGUF files: config from metadata, tensors dequantized and renamed to Hugging Face names.

Supported GGUF architectures: llama (Llama, Mistral, SmolLM2; Mixtral when the file has
experts), qwen2, qwen3, qwen2moe, qwen3moe.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from paraserve.models.loader import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# (GGUF architecture, has experts) -> HF architecture and the config fields GGUF names differently.
_HF_ARCH = {
    ("llama", False): "LlamaForCausalLM",
    ("llama", True): "MixtralForCausalLM",
    ("qwen2", False): "Qwen2ForCausalLM",
    ("qwen3", False): "Qwen3ForCausalLM",
    ("qwen2moe", True): "Qwen2MoeForCausalLM",
    ("qwen3moe", True): "Qwen3MoeForCausalLM",
}
_NUM_EXPERTS_FIELD = {"MixtralForCausalLM": "num_local_experts"}  # the Qwen MoE configs say num_experts

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Mixtral checkpoints keep the original w1/w2/w3 names under block_sparse_moe.
_MIXTRAL_EXPERT = {"gate": "w1", "down": "w2", "up": "w3"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+?)(?:_exps|\.(\d+))?\.(weight|bias)")
# Tensors llama.cpp derives for its own kernels; HF configs carry the same information.
_SKIPPED = {"rope_freqs.weight"}


def read_gguf_config(path: str) -> PretrainedConfig:
    return _build_config(_open(path))


def read_gguf_chat_template(path: str) -> str | None:
    return _field(_open(path), "tokenizer.chat_template")


def iter_gguf_weights(path: str, display_name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    import gguf
    from tqdm.auto import tqdm

    reader = _open(path)
    config = _build_config(reader)
    mixtral = config.architectures[0] == "MixtralForCausalLM"
    # llama.cpp's converter interleaves Q/K rows for its rope layout only for the llama arch.
    unpermute = _field(reader, "general.architecture") == "llama"
    start = time.perf_counter()
    desc = f"Loading {display_name or 'GGUF'}"
    for t in tqdm(reader.tensors, desc=desc, unit="tensor", disable=not sys.stderr.isatty()):
        if t.name in _SKIPPED:
            logger.warning(
                "ignoring GGUF tensor %s: per-dimension rope frequency factors (Llama 3.1+ rope scaling) are not "
                "applied, so long-range outputs may differ from the original model", t.name)
            continue
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"GGUF tensor {t.name} uses quantization {t.tensor_type.name}, which cannot be decoded: {e}"
            ) from e
        # GGUF lists dims fastest-first; PyTorch wants them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensor = torch.from_numpy(_writable_f32(values).reshape(shape))
        for name, value in _to_hf(t.name, tensor, mixtral):
            if unpermute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
                value = _unpermute_rows(value, heads)
            yield name, value
    logger.info("loaded %d GGUF tensors from %s in %.1f s", len(reader.tensors), path, time.perf_counter() - start)


def _open(path: str) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}; is it a complete, valid GGUF file?") from e


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _build_config(reader: GGUFReader) -> PretrainedConfig:
    try:
        return _build_config_unchecked(reader)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"GGUF metadata of {reader.data.filename} is incomplete or invalid: {e!r}") from e


def _build_config_unchecked(reader: GGUFReader) -> PretrainedConfig:
    import transformers

    arch = _field(reader, "general.architecture")
    names = {t.name for t in reader.tensors}

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_experts = int(meta("expert_count", 0) or 0)
    hf_arch = _HF_ARCH.get((arch, num_experts > 0))
    if hf_arch is None:
        kind = "MoE " if num_experts else ""
        raise ModelLoadError(
            f"GGUF {kind}architecture {arch!r} is not supported; supported GGUF architectures: "
            "llama (incl. Mistral/Mixtral), qwen2, qwen3, qwen2moe, qwen3moe"
        )
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    # Qwen3's head_dim is not hidden/heads; llama files record it only as the rope dimension.
    head_dim = meta("attention.key_length") or (meta("rope.dimension_count") if arch == "llama" else None)
    vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    kw: dict[str, Any] = dict(
        architectures=[hf_arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        max_position_embeddings=int(meta("context_length", 2048)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=_rope_parameters(float(meta("rope.freq_base", 10000.0)), meta),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    if meta("feed_forward_length") is not None:
        kw["intermediate_size"] = int(meta("feed_forward_length"))
    if hf_arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        kw["attention_bias"] = "blk.0.attn_q.bias" in names
    if hf_arch == "LlamaForCausalLM":
        kw["mlp_bias"] = "blk.0.ffn_down.bias" in names
    if num_experts:
        kw[_NUM_EXPERTS_FIELD.get(hf_arch, "num_experts")] = num_experts
        kw["num_experts_per_tok"] = int(meta("expert_used_count"))
    if meta("expert_feed_forward_length") is not None and hf_arch != "MixtralForCausalLM":
        kw["moe_intermediate_size"] = int(meta("expert_feed_forward_length"))
    if meta("expert_shared_feed_forward_length") is not None:
        kw["shared_expert_intermediate_size"] = int(meta("expert_shared_feed_forward_length"))
    if hf_arch == "Qwen3MoeForCausalLM":
        # llama.cpp always renormalises Qwen3-MoE top-k weights unless the file says otherwise.
        kw["norm_topk_prob"] = bool(meta("expert_weights_norm", True))
    config_cls = getattr(transformers, hf_arch.replace("ForCausalLM", "Config"))
    return config_cls(**{k: v for k, v in kw.items() if v is not None})


def _rope_parameters(theta: float, meta: Any) -> dict[str, Any]:
    scaling = meta("rope.scaling.type")
    if scaling in (None, "none"):
        return {"rope_type": "default", "rope_theta": theta}
    params: dict[str, Any] = {"rope_type": scaling, "rope_theta": theta}
    params["factor"] = float(meta("rope.scaling.factor", 1.0))
    if meta("rope.scaling.original_context_length") is not None:
        params["original_max_position_embeddings"] = int(meta("rope.scaling.original_context_length"))
    return params


def _to_hf(gguf_name: str, tensor: torch.Tensor, mixtral: bool) -> Iterator[tuple[str, torch.Tensor]]:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        yield f"{_GLOBAL_NAMES[base]}.{suffix}", tensor
        return
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None:
        raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file; this model variant is not supported")
    layer, kind, expert, suffix = m.groups()
    prefix = f"model.layers.{layer}"
    stacked = gguf_name.endswith(f"_exps.{suffix}")
    if stacked or expert is not None:
        proj = kind.removeprefix("ffn_")
        if proj not in _MIXTRAL_EXPERT:
            raise ModelLoadError(f"unexpected expert tensor {gguf_name!r} in GGUF file")
        experts = enumerate(tensor) if stacked else [(int(expert), tensor)]  # stacked: [n_experts, out, in]
        for e, w in experts:
            if mixtral:
                yield f"{prefix}.block_sparse_moe.experts.{e}.{_MIXTRAL_EXPERT[proj]}.{suffix}", w
            else:
                yield f"{prefix}.mlp.experts.{e}.{proj}_proj.{suffix}", w
    elif kind == "ffn_gate_inp":
        yield f"{prefix}.{'block_sparse_moe' if mixtral else 'mlp'}.gate.{suffix}", tensor
    elif kind == "ffn_gate_inp_shexp":
        # llama.cpp stores this [1, hidden] linear as a vector.
        yield f"{prefix}.{_BLOCK_NAMES[kind]}.{suffix}", tensor.reshape(1, -1)
    elif kind in _BLOCK_NAMES:
        yield f"{prefix}.{_BLOCK_NAMES[kind]}.{suffix}", tensor
    else:
        raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file; this model variant is not supported")


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    # convert_hf_to_gguf.py stores each head's rows as (2, head_dim/2) -> (head_dim/2, 2); swap back.
    shape = w.shape
    return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape).contiguous()


def _writable_f32(values: np.ndarray) -> np.ndarray:
    # F32/F16 tensors come back as views of the read-only memory map.
    out = values.astype(np.float32, copy=False)
    return out if out.flags.writeable and out.flags.c_contiguous else np.array(out, dtype=np.float32)
