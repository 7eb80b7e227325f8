"""Tiny random transformers models, built from configs: fast, offline, deterministic."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int = 0, vocab: int = 128, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


def randomize_adapters(model, std: float = 0.1, seed: int = 1) -> None:
    """Give every adapter tensor non-trivial values (B starts at 0, which would hide bugs)."""
    from lorakit.adapters import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name, p in sorted(layer.named_parameters()):
                if ".lora." in f".{name}" or name.startswith(("lora.", "tokens.", "lora_copies.")):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture(scope="session", autouse=True)
def native_kernel():
    """lorakit's native CPU kernel (fast/native), built once per machine and loaded for the whole session, as
    `lorakit serve` does at start-up: every test sees the same path whatever runs before it, and the servers
    the tests start find the build in the cache. Without a C++ compiler the eager path stays (and
    test_fast_native skips)."""
    import shutil

    from lorakit.fast import native

    if shutil.which("c++") or shutil.which("g++"):
        reason = native.load()
        assert reason is None, f"the native kernel did not build: {reason}"


@pytest.fixture
def ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def rows_alone(model, ids, names):
    """The logits of each batch row of `ids` alone, under its adapter names[i] (None: adapters disabled): the
    reference a per-row (mixed) batch must equal."""
    import lorakit

    rows = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n is None:
                with lorakit.disable_adapters(model):
                    rows.append(model(ids[i : i + 1]).logits)
            else:
                lorakit.set_adapter(model, n)
                rows.append(model(ids[i : i + 1]).logits)
    return torch.cat(rows)


def tiny_tokenizer():
    """A character-level tokenizer (ids < 128, fits the tiny models) with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "</s>"],
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def bnb_unusable() -> str:
    """Why bitsandbytes cannot quantize here ("" when it can): not installed, or a build without a CPU backend."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install 'lorakit[quant]')"
    try:
        bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")(torch.randn(1, 64))
    except Exception as err:
        return f"bitsandbytes cannot run here: {err}"
    return ""


def quantizable_llama_dir(path):
    """A tiny Llama + tiny_tokenizer saved in `path`, with widths bitsandbytes' 4-bit blocks accept (64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
