"""export_merged: base model + adapter -> one plain Hugging Face model directory (`lorakit merge`).

The directory (safetensors weights, config.json, tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained` alone and computes what base + adapter computes. A
quantized base (or `quantize="4bit"|"8bit"`) is dequantized first and saved in full precision: LoRA deltas
cannot be folded into packed 4-/8-bit weights without re-quantizing them, which would lose the adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_dir


@dataclass
class MergeReport:
    output: Path
    dequantized: bool  # the base was quantized and was saved dequantized, in `dtype`
    dtype: torch.dtype
    num_params: int


def export_merged(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    quantize: str = "none",
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    ignore_fingerprint: bool = False,
) -> MergeReport:
    """Merge `adapter` into base `model` and save the result as a plain model directory, atomically.

    Args:
        model: as `lorakit.models.load_model` ("default", an HF directory, a .gguf file).
        adapter: an adapter directory (a grown vocabulary and its tokenizer are handled as load_model does).
        output: the directory to create. Everything is written to a temporary sibling first and renamed into
            place at the end (atomic.write_dir), so a failure leaves nothing behind and, with `overwrite`, a
            kill at any instant leaves the complete old directory or the complete new one.
        quantize: load the base quantized ("4bit"/"8bit", e.g. to reproduce a QLoRA run's base exactly);
            the weights are then dequantized before merging.
        dtype: the dtype the merge is computed and saved in (default float32).
        overwrite: replace an existing `output` directory.
        ignore_fingerprint: merge even when the adapter's base fingerprint differs from `model`'s.

    Raises:
        ValueError: `output` exists (and `overwrite` is False), or the merged weights hold NaN / inf
            (nothing is written).
        FileNotFoundError / AdapterFileError / RuntimeError: from loading, or a LoRA on tied weights that
            cannot be merged (see lorakit.merge).
    """
    from .merge import unload
    from .models import is_quantized, load_model, resolve_dtype, with_adapter

    out = Path(output)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists; choose a new directory (or pass --overwrite)")
    torch_dtype = resolve_dtype(dtype) or torch.float32
    base, tokenizer = load_model(model, dtype=torch_dtype, quantize=quantize)
    dequantized = is_quantized(base) or getattr(base, "hf_quantizer", None) is not None
    if dequantized:
        base = base.dequantize(dtype=torch_dtype)
        base.hf_quantizer = None
        base.is_quantized = False
        for holder in (base, base.config):
            if hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
    # The fingerprint was taken on float (or, for QLoRA, on no) weights; dequantized NF4 / int8 weights are
    # not those bit for bit, so the check is skipped only in that case.
    tokenizer = with_adapter(base, tokenizer, adapter, ignore_fingerprint=dequantized or ignore_fingerprint)
    merged = unload(base, merge=True).to(torch_dtype)
    merged.config.dtype = torch_dtype

    _check_finite(merged)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    # Old or new, never none: an existing output is swapped with the complete new one in one step.
    write_dir(out, fill, overwrite=overwrite)
    num = sum(p.numel() for p in merged.parameters())
    return MergeReport(out, dequantized, torch_dtype, num)


def _check_finite(model: torch.nn.Module) -> None:
    """Refuse to save a model with NaN / inf weights (naming the first ones and the counts)."""
    bad = []
    for name, t in model.named_parameters():  # buffers are left alone: masks may hold -inf by design
        if t.is_floating_point():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"the merged model has non-finite (NaN / inf) values in {shown}; nothing was written"
        )
