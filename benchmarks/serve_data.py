"""What the serving benchmarks build: random adapters for a base, the kinds vLLM refuses, a tokenizer, a scratch folder.

Used by bench_serve.py (HTTP / in-process scenarios) and serve_shape.py (the decode step at a realistic size).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lorakit  # noqa: E402


def random_adapters(base, tmp: Path, n: int, rank: int) -> list[Path]:
    """`n` plain r=`rank` all-linear adapters a0..a{n-1} with random factors (seeded by their index), saved under
    tmp/adapters and taken off `base` again; their directories."""
    dirs = []
    for i in range(n):
        lorakit.add_adapter(
            base, lorakit.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear"), name=f"a{i}"
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if f".lora.a{i}." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(lorakit.save_adapter(base, tmp / "adapters", name=f"a{i}"))
        lorakit.delete_adapter(base, f"a{i}")
    return dirs


KINDS = ("k_dora", "k_tokens", "k_saved")


def kinds(base, tmp: Path, rank: int) -> list[Path]:
    """A DoRA adapter, one with trainable tokens (10 rows of the embedding) and one with modules_to_save (the
    final norm), each with r=`rank` LoRA on every linear layer."""
    extra = {"k_dora": {"use_dora": True}, "k_tokens": {"trainable_token_indices": list(range(3, 13))},
             "k_saved": {"modules_to_save": ["model.norm"]}}  # fmt: skip
    dirs = []
    for i, (name, kw) in enumerate(extra.items()):
        lorakit.add_adapter(
            base, lorakit.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear", **kw), name=name
        )
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in base.named_parameters():
                if f".{name}." in pname:  # its LoRA factors, token rows and saved copy
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(lorakit.save_adapter(base, tmp / "adapters", name=name))
        lorakit.delete_adapter(base, name)
    return dirs


def char_tokenizer():
    """A character-level tokenizer (ids < 128) with ChatML specials, as the tests' tiny_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>", unk_token="<unk>")  # fmt: skip


def scratch_dir() -> Path:
    """A fresh folder for the run's model and adapters (~150 MB to 2.5 GB), removed when the script exits."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp
