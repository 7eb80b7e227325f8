"""`lorakit export`: a thin argparse wrapper over lorakit.gguf (merged GGUF, llama.cpp LoRA GGUF, Ollama)."""

from __future__ import annotations

import argparse

FORMATS = ("gguf", "gguf-lora", "ollama")
# writer.QUANTS' names, listed here so that `lorakit --help` does not import the gguf package.
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def register(sub) -> None:
    """Add `export` to the `lorakit` parser's subparsers."""
    p = sub.add_parser(
        "export",
        help="write a model + adapter for llama.cpp / Ollama: merged GGUF, LoRA GGUF, or GGUF + Modelfile",
        description=(
            "gguf: the merged model as one GGUF file (tokenizer and chat template inside). gguf-lora: the "
            "adapter as a llama.cpp LoRA GGUF (--lora), each module's scale folded in. ollama: the merged GGUF "
            "and a Modelfile (TEMPLATE, stop tokens, SYSTEM) in a directory, for `ollama create NAME -f "
            "DIR/Modelfile`."
        ),
    )
    p.add_argument("--model", default=None,
                   help="base model: 'default', an HF directory or a .gguf file (gguf-lora: default the "
                   "adapter's base_model_name_or_path; else 'default')")  # fmt: skip
    p.add_argument(
        "--adapter", help="adapter directory (required for gguf-lora; without it gguf exports the base)"
    )
    p.add_argument("--format", choices=FORMATS, default="gguf", help="gguf (default), gguf-lora or ollama")
    p.add_argument("--quant", choices=QUANT_NAMES, default=None,
                   help="tensor type: f16 for gguf / ollama, f32 for gguf-lora when not given; "
                   "k-quants: export f16, then run llama.cpp's llama-quantize")  # fmt: skip
    p.add_argument(
        "--output", help="file (gguf, gguf-lora) or directory (ollama); default inside the adapter dir"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    if args.format == "gguf-lora":
        from .lora import export_gguf_lora

        if not args.adapter:
            raise ValueError("--format gguf-lora needs --adapter")
        info = export_gguf_lora(args.adapter, args.model, args.output, args.quant or "f32", args.overwrite)
        print(
            f"wrote {info['output']} ({info['arch']} LoRA, {info['modules']} modules, alpha {info['alpha']:g}; "
            "every module's scale folded into B)"
        )
        print(f"use: llama-cli -m BASE.gguf --lora {info['output']}")
        return 0
    model = args.model or "default"
    if args.model is None and args.adapter:
        from ..io.files import read_config
        from .lora import base_spec

        model = base_spec(None, read_config(args.adapter))  # the base the adapter records, when local
    quant = args.quant or "f16"
    if args.format == "ollama":
        from .ollama import export_ollama

        info = export_ollama(model, args.adapter, args.output, quant, args.overwrite)
        print(
            f"wrote {info['gguf']} and {info['modelfile']} ({info['family']} template, stops {info['stops']})"
        )
        print(f"use: ollama create NAME -f {info['modelfile']}")
        return 0
    from .writer import export_gguf

    report = export_gguf(model, args.adapter, args.output, quant, args.overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(report.tensor_types.items()))
    print(f"wrote {report.output} ({report.arch}, {quant}: {types}; {report.file_bytes / 1e6:.1f} MB)")
    if report.fallbacks:
        print(f"  {len(report.fallbacks)} tensors as F16 (rows not a multiple of 32): {report.fallbacks[:4]}")
    return 0
