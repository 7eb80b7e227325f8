"""The tokenizer inside a GGUF file: vocabulary, token types, merges, special ids and the chat template, written
from the Hugging Face tokenizer the model was trained with (so llama.cpp / Ollama tokenize as lorakit did).

Supported: byte-level BPE tokenizers (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM / SmolLM2, Llama-3,
Qwen2). llama.cpp needs the pre-tokenizer by name (`tokenizer.ggml.pre`); it is read off the tokenizer.json's
pre-tokenizer, and an unknown one is an error rather than a silently different tokenization.
"""

from __future__ import annotations

import json
from typing import Any

import gguf

# Byte-level pre-tokenizers by their tokenizer.json shape -> llama.cpp's name (llama-vocab.cpp).
_KNOWN_PRE = (
    "gpt-2 (plain ByteLevel), smollm (Digits + ByteLevel), llama-bpe (Llama-3 split), qwen2 (Qwen2 split)"
)


def pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json.

    Raises:
        ValueError: a pre-tokenizer llama.cpp has no name for (in the known families).
    """
    pre = tok_json.get("pre_tokenizer") or {}
    parts = _parts(tok_json)
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if len(types) >= 2 and types[0] == "Split" and types[-1] == "ByteLevel":
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"\p{N}|" in regex:
            return "qwen2"
    raise ValueError(
        f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by "
        f"name; supported: {_KNOWN_PRE}"
    )


def _parts(tok_json: dict[str, Any]) -> list[dict[str, Any]]:
    pre = tok_json.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def write_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write `tokenizer.ggml.*` and `tokenizer.chat_template` for `tokenizer` (a transformers fast tokenizer).

    `vocab_size` is the model's embedding rows; ids the tokenizer lacks (padding rows) are written as
    `[PAD<id>]` tokens of type UNUSED, as llama.cpp's converter does.

    Raises:
        ValueError: not a fast tokenizer, not byte-level BPE, an unknown pre-tokenizer, or more tokens than
            the model has rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model") or {}
    decoder = (tok_json.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ValueError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3, Qwen2); this one is "
            f"{model.get('type')!r} with decoder {decoder!r}"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"GGUF export: the tokenizer has id {max(vocab.values())} but the model only {vocab_size} "
            "embedding rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    byte_level = [p for p in _parts(tok_json) if p.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(byte_level and byte_level[-1].get("add_prefix_space")))
    _write_specials(writer, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def _write_specials(writer: gguf.GGUFWriter, tokenizer: Any) -> None:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in ids.items():
        if token_id is not None:
            adders[kind](int(token_id))
    # What the tokenizer really does on plain text, not what a flag claims: llama.cpp adds BOS / EOS by these.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"])
    writer.add_add_eos_token(bool(probe) and ids["eos"] is not None and probe[-1] == ids["eos"])
