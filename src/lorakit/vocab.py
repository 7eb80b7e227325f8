"""Growing a model's vocabulary for new tokens, deterministically.

New rows of the input embedding (and of an untied output head) are the mean of the old rows, computed in
float64 on the CPU, so growing the same base for the same tokenizer twice (when training starts and when the
adapter is loaded again) gives bit-identical weights: the base fingerprint an adapter carries still matches.
transformers' `mean_resizing` samples the new rows at random, which would break that.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .inject import head_is_tied
from .textfile import read_utf8

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def read_new_tokens(path: str | os.PathLike, tokenizer) -> list[str]:
    """The tokens listed in `path`, one per line (a final newline is fine).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: naming `path:line` for a blank line, a duplicate (and its first line), a token the
            tokenizer already has, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--new-tokens file {path} not found")
    text = read_utf8(path, "UTF-8 text")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = tokenizer.get_vocab()
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines, start=1):
        token = raw.rstrip("\r")
        if not token.strip():
            raise ValueError(f"{path}:{i}: blank line; expected one new token per line")
        if token in seen:
            raise ValueError(f"{path}:{i}: token {token!r} is listed twice (first on line {seen[token]})")
        if token in vocab:
            raise ValueError(
                f"{path}:{i}: token {token!r} is already in the tokenizer's vocabulary (id {vocab[token]})"
            )
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:  # byte-level vocabularies store "ä" as "Ã¤": compare by what it encodes to
            raise ValueError(
                f"{path}:{i}: token {token!r} is already one token of the tokenizer (id {ids[0]})"
            )
        seen[token] = i
    if not seen:
        raise ValueError(f"{path}: no tokens; expected one new token per line")
    return list(seen)


def vocab_size_for(model: nn.Module, tokenizer) -> int:
    """The embedding size that holds every id of `tokenizer`: never smaller than the model's own."""
    return max(model.get_input_embeddings().num_embeddings, len(tokenizer))


def grow_embeddings(model: nn.Module, size: int) -> list[int]:
    """Grow the input embedding (and an untied output head) of `model` to `size` rows in place.

    New rows (and new head biases) are the mean of the old ones, in float64 on the CPU, then cast: the same
    inputs always give the same bits. Tied weights stay tied. Returns the new row ids (empty when `size`
    is not larger than the embedding).
    """
    emb = model.get_input_embeddings()
    old = emb.num_embeddings
    if size <= old:
        return []
    head = model.get_output_embeddings()
    tied = head_is_tied(model)
    means = {"emb": _row_mean(emb.weight)}
    if head is not None and not tied:
        means["head"] = _row_mean(head.weight)
        if getattr(head, "bias", None) is not None:
            means["bias"] = head.bias.detach().to("cpu", torch.float64).mean()
    # transformers fills the new rows at random (mean_resizing=False); keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        model.resize_token_embeddings(size, mean_resizing=False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    with torch.no_grad():
        emb.weight[old:] = means["emb"].to(emb.weight.dtype).to(emb.weight.device)
        if "head" in means:
            head.weight[old:] = means["head"].to(head.weight.dtype).to(head.weight.device)
        if "bias" in means:
            head.bias[old:] = means["bias"].to(head.bias.dtype)
    return list(range(old, size))


def _row_mean(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to("cpu", torch.float64).mean(dim=0)


def has_tokenizer(path: str | os.PathLike) -> bool:
    """True when directory `path` holds tokenizer files (an adapter saved with a grown vocabulary)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)
