"""Tiny models with a byte-level BPE tokenizer (what GGUF export supports), saved as HF directories."""

from __future__ import annotations

import torch

from conftest import CHAT_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]


def byte_bpe_tokenizer():
    """A byte-level BPE tokenizer: 3 ChatML specials (ids 0-2), the 256 byte symbols, 5 merges (264 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = SPECIALS + list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES]
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", additional_special_tokens=SPECIALS,
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_dir(path, model_type: str = "llama", tie: bool = False, seed: int = 0):
    """A tiny random `model_type` ("llama", "qwen2", "mistral") + byte_bpe_tokenizer saved in `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-6,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms, so a mis-mapped norm tensor shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
