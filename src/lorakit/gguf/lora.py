"""export_gguf_lora: an adapter directory -> a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora file.gguf`).

llama.cpp applies ΔW = (alpha / r_t) · B_t A_t to tensor t, with one `adapter.lora.alpha` for the whole file
and r_t read off each B's shape (llama-adapter.h `get_scale`). It knows neither rsLoRA nor per-module alphas,
so each module's true scale s (alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA, after rank_pattern /
alpha_pattern) is folded into B: B' = B · s · r_m / alpha_file, and llama.cpp's alpha_file / r_m · B' A = s B A.

What llama.cpp cannot apply is refused, naming the merged export that does carry it: DoRA (a per-column
renormalisation, not a low-rank sum), modules_to_save and trainable tokens (full tensors / rows, which a LoRA
file cannot hold), biases, LoRA on the embedding (not exported here) and on a tied output head (a tied model
has no `output.weight` in llama.cpp).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf

from ..io.base_ref import DEFAULT_MODEL_NAME
from ..tools.consumers import llama_cpp_problems
from . import arch as A
from .writer import QUANTS, check_output, default_output, encode, write_atomic

MERGED_HINT = "export the merged model instead: lorakit export --format gguf (or ollama) carries it exactly"


def export_gguf_lora(
    adapter: str | os.PathLike,
    model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    quant: str = "f32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `adapter` as a llama.cpp LoRA GGUF, atomically.

    Args:
        adapter: the adapter directory.
        model: the base ("default", an HF directory, a .gguf file) whose config gives the architecture and
            head counts; default: the adapter's `base_model_name_or_path` when that is local or the default model.
        output: the .gguf file (default `<adapter>/adapter-<quant>.gguf`).
        quant: f32 (default), f16, bf16 or q8_0 (LoRA factors are small; rank-wide rows that are not a multiple
            of 32 fall back to F16 under q8_0).

    Returns:
        {output, arch, alpha (written), modules, scales ({module: true scale folded in})}.

    Raises:
        ValueError: what llama.cpp cannot apply (see the module docstring), an unsupported architecture, an
            unknown quant, or an existing output. AdapterFileError: a malformed adapter.
    """
    from ..tools.adapter_file import open_adapter

    if quant not in ("f32", "f16", "bf16", "q8_0"):
        raise ValueError(f"--quant {quant!r} is invalid for gguf-lora: expected f32, f16, bf16 or q8_0")
    out = Path(output) if output is not None else default_output(adapter, f"adapter-{quant}.gguf")
    check_output(out, overwrite)
    view = open_adapter(adapter)
    refuse_unsupported(view)
    config = base_config(model, view.raw_config)
    spec = A.arch_for(config)
    if A.is_tied(config) and "lm_head" in {n.rsplit(".", 1)[-1] for n in view.modules}:
        raise ValueError(
            f"{view.path}: LoRA on lm_head of a model with tied embeddings: llama.cpp has no output.weight "
            f"to apply it to; {MERGED_HINT}"
        )
    name_map = gguf.get_tensor_name_map(spec.arch, int(config.num_hidden_layers))
    alpha_file = float(max(m.r for m in view.modules.values()))
    qtype = QUANTS[quant][0]

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp reads this with gguf_get_val_f32: it must be FLOAT32 (another type aborts the load).
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha_file)
        for name, m in view.modules.items():
            base = A.tensor_name(name_map, f"{name}.weight")
            B = A.float_rows(m.B) * (m.scale * m.r / alpha_file)
            B = A.to_gguf_layout(spec, config, f"{name}.weight", B)
            for suffix, t in ((".lora_a", A.float_rows(m.A)), (".lora_b", B)):
                data, raw = encode(t.numpy(), qtype)
                writer.add_tensor(base + suffix, data, raw_dtype=raw)

    write_atomic(out, spec.name, fill)
    return {
        "output": out,
        "arch": spec.name,
        "alpha": alpha_file,
        "modules": len(view.modules),
        "scales": {n: m.scale for n, m in view.modules.items()},
    }


def refuse_unsupported(view) -> None:
    problems = llama_cpp_problems(view)
    if problems:
        raise ValueError(
            f"{view.path}: llama.cpp's LoRA GGUF cannot carry: " + "; ".join(problems) + f". {MERGED_HINT}"
        )


def base_spec(model: str | os.PathLike | None, adapter_config: dict) -> str:
    """The base model spec for load_model: `model`, else the adapter's `base_model_name_or_path` when lorakit
    can load it locally (the default model's hub id -> "default", an existing path).

    Raises:
        ValueError: neither is given / usable.
    """
    if model is not None:
        return str(model)
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded in (None, "default", DEFAULT_MODEL_NAME):
        return "default"
    if Path(recorded).expanduser().exists():
        return str(recorded)
    raise ValueError(
        f"the adapter's base_model_name_or_path {recorded!r} is not a local path and lorakit never downloads; "
        "pass --model with the base model's directory or .gguf file"
    )


def base_config(model: str | os.PathLike | None, adapter_config: dict):
    """The transformers config of the base (no weights loaded)."""
    from transformers import AutoConfig

    from ..models import model_dir

    return AutoConfig.from_pretrained(str(model_dir(base_spec(model, adapter_config))), local_files_only=True)
