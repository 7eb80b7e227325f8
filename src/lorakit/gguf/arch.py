"""Which Hugging Face architectures export to GGUF, and how: llama.cpp's architecture name, its hyperparameter
keys, its tensor names and the one layout change it makes (the q/k rows of Llama-style models).

The names come from the `gguf` package itself (`gguf.MODEL_ARCH`, `gguf.get_tensor_name_map`, `gguf.Keys`), the
same tables llama.cpp's `convert_hf_to_gguf.py` uses, so a renamed key upstream shows up here as an error
rather than a silently unreadable file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch
from torch import Tensor


@dataclass(frozen=True)
class ArchSpec:
    """How one HF `model_type` is written.

    Args:
        arch: llama.cpp's architecture (`general.architecture`, the prefix of the hyperparameter keys).
        rope_permute: llama.cpp's Llama graph applies RoPE to interleaved pairs, HF to two halves, so its
            converter reorders the rows of q_proj / k_proj within each head (`permute_qk`); Qwen2 uses
            llama.cpp's NeoX RoPE and keeps HF's order.
        rope_dim: write `<arch>.rope.dimension_count` (the head dim).
    """

    arch: gguf.MODEL_ARCH
    rope_permute: bool
    rope_dim: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# HF model_type -> spec. Mistral is written as "llama", as llama.cpp's own converter does (same graph; llama.cpp
# ignores a sliding window there, so prompts longer than `sliding_window` differ from transformers' Mistral).
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, rope_permute=True, rope_dim=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, rope_permute=True, rope_dim=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, rope_permute=False, rope_dim=False),
}


def arch_for(config: Any) -> ArchSpec:
    """The spec of a transformers config.

    Raises:
        ValueError: an architecture lorakit does not export (naming the supported ones), or RoPE scaling
            (llama.cpp needs extra tensors / keys for it that lorakit does not write yet).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"GGUF export supports model_type {sorted(ARCHS)}; this model is {model_type!r}. "
            "Export a merged HF directory with `lorakit merge` and convert it with llama.cpp's "
            "convert_hf_to_gguf.py instead"
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(
            f"GGUF export: RoPE scaling {rope.get('rope_type')!r} ({model_type}) is not written by lorakit yet; "
            "only the default RoPE is supported"
        )
    return ARCHS[model_type]


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings across transformers versions (5.x `rope_parameters`, 4.x `rope_theta` / `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer: gguf.GGUFWriter, spec: ArchSpec, config: Any) -> None:
    """The `<arch>.*` keys llama.cpp reads for this architecture (llama-model.cpp `load_hparams`)."""
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config.vocab_size))
    dim = head_dim(config)
    if spec.rope_dim:
        writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)


def permute_qk(rows: Tensor, n_head: int) -> Tensor:
    """Reorder the output rows of a q/k projection (or of its LoRA B) from HF's RoPE layout (each head's
    first half, then second half) to llama.cpp's (interleaved pairs): within each head, row i of half h goes
    to position 2i + h. `rows` is (n_head · head_dim, ...)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """llama.cpp's name of an HF parameter (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`).

    Raises:
        ValueError: a parameter llama.cpp's graph for this architecture has no tensor for.
    """
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ValueError(f"GGUF export: no llama.cpp tensor for parameter {hf_name!r} of this architecture")
    return new


def to_gguf_layout(spec: ArchSpec, config: Any, hf_name: str, rows: Tensor) -> Tensor:
    """`rows` (a weight, bias or LoRA B of `hf_name`) in llama.cpp's layout."""
    if spec.rope_permute:
        n_head = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_qk(rows, n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_qk(rows, n_kv)
    return rows


def is_tied(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def float_rows(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()
