"""export_gguf: base model + adapter -> one merged GGUF file (weights, hyperparameters, tokenizer, chat template)
that llama.cpp, Ollama and transformers (`gguf_file=`) read. Written with the `gguf` package; no converter
script, no network.

Quantization types are the ones the `gguf` package can *write* (its `quants` module quantizes BF16, Q8_0,
Q5_1, Q5_0, Q4_1, Q4_0; the k-quants Q2_K..Q6_K it can only read). For k-quants, export f16 and run llama.cpp's
`llama-quantize` on it. As in llama.cpp's converter, 1-D tensors (norms, biases) stay F32, and a matrix whose
rows are not a multiple of the 32-value block falls back to F16; with the 4-/5-bit types the embedding and the
output head are Q8_0 (the tensors most sensitive to quantization).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn as nn

from . import arch as A
from .vocab import write_vocab

Q = gguf.GGMLQuantizationType
# --quant name -> (tensor type, general.file_type)
QUANTS: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_LOW_BIT = (Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)
_KEEP_Q8 = ("token_embd.weight", "output.weight")


@dataclass
class GGUFReport:
    output: Path
    arch: str
    quant: str
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    # tensors written F16 instead of the quant type (their rows are not a multiple of the 32-value block)
    fallbacks: list[str] = field(default_factory=list)
    file_bytes: int = 0


def export_gguf(
    model: str | os.PathLike = "default",
    adapter: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    quant: str = "f16",
    overwrite: bool = False,
) -> GGUFReport:
    """Merge `adapter` into `model` (fp32) and write the result as one GGUF file, atomically.

    Args:
        model: as `lorakit.models.load_model` ("default", an HF directory, a .gguf file).
        adapter: an adapter directory, or None to export the base model itself.
        output: the .gguf file (default: `<adapter>/model-<quant>.gguf`, or `model-<quant>.gguf`).
        quant: one of QUANTS.
        overwrite: replace an existing file.

    Raises:
        ValueError: unknown quant, an architecture / tokenizer / RoPE variant not exported, existing output.
        FileNotFoundError / AdapterFileError: from loading.
    """
    from ..merge import unload
    from ..models import load_model

    check_quant(quant)
    out = Path(output) if output is not None else default_output(adapter, f"model-{quant}.gguf")
    check_output(out, overwrite)
    base, tokenizer = load_model(model, dtype=torch.float32, adapter=adapter)
    merged = unload(base, merge=True) if adapter is not None else base
    return write_gguf(merged, tokenizer, out, quant)


def write_gguf(model: nn.Module, tokenizer: Any, output: str | os.PathLike, quant: str = "f16") -> GGUFReport:
    """Write a plain transformers causal LM (no adapter layers) and its tokenizer as a GGUF file, atomically."""
    check_quant(quant)
    config = model.config
    spec = A.arch_for(config)
    out = Path(output)
    qtype, ftype = QUANTS[quant]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if A.is_tied(config):
        state.pop("lm_head.weight", None)
    name_map = gguf.get_tensor_name_map(spec.arch, int(config.num_hidden_layers))

    def fill(writer: gguf.GGUFWriter) -> tuple[Counter, list[str]]:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(getattr(config, "name_or_path", "") or "lorakit export").rsplit("/", 1)[-1])
        A.write_hparams(writer, spec, config)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, tokenizer, int(config.vocab_size))
        counts: Counter = Counter()
        fallbacks: list[str] = []
        for hf_name, value in state.items():
            new = A.tensor_name(name_map, hf_name)
            rows = A.to_gguf_layout(spec, config, hf_name, A.float_rows(value))
            data, raw = encode(rows.numpy(), _type_for(new, rows, qtype))
            if raw is Q.F16 and qtype not in (Q.F16, Q.F32) and rows.ndim > 1:
                fallbacks.append(new)
            writer.add_tensor(new, data, raw_dtype=raw)
            counts[raw.name] += 1
        return counts, fallbacks

    counts, fallbacks = write_atomic(out, spec.name, fill)
    return GGUFReport(out, spec.name, quant, dict(counts), fallbacks, out.stat().st_size)


def _type_for(name: str, rows: torch.Tensor, qtype: Q) -> Q:
    if rows.ndim <= 1:
        return Q.F32
    if qtype in _LOW_BIT and name in _KEEP_Q8:
        return Q.Q8_0
    return qtype


def encode(values: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """`values` (fp32) as GGUF tensor data of `qtype`; a quantized type whose 32-value block does not divide
    the row length falls back to F16 (the second item says which type was written)."""
    if qtype is Q.F32:
        return values.astype(np.float32), Q.F32
    if qtype is Q.F16:
        return values.astype(np.float16), Q.F16
    try:
        return gguf.quants.quantize(values, qtype), qtype
    except gguf.quants.QuantError:
        return values.astype(np.float16), Q.F16


def write_atomic(out: Path, arch: str, fill):
    """Run `fill(writer)` on a GGUFWriter for a temporary sibling of `out`, write it, rename it into place.
    A failure leaves no partial file. Returns what `fill` returns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        result = fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ValueError(
            f"--quant {quant!r} is invalid: expected one of {list(QUANTS)} (k-quants such as Q4_K_M: export f16, "
            "then run llama.cpp's llama-quantize; the gguf package cannot write them)"
        )


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another --output (or pass --overwrite)")
    if out.suffix != ".gguf":
        raise ValueError(f"--output {out} must end in .gguf")


def default_output(adapter: str | os.PathLike | None, filename: str) -> Path:
    return (Path(adapter) / filename) if adapter is not None else Path(filename)
