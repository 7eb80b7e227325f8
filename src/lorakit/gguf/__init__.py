"""GGUF export: the merged model for llama.cpp / Ollama / transformers, the adapter as a llama.cpp LoRA GGUF,
and an Ollama Modelfile whose template is translated from the HF chat template. Needs the `gguf` package
(`pip install 'lorakit[export]'`); it is imported on first use, so `lorakit --help` works without it."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QUANTS": "writer",
    "GGUFReport": "writer",
    "export_gguf": "writer",
    "write_gguf": "writer",
    "export_gguf_lora": "lora",
    "export_ollama": "ollama",
    "translate": "ollama",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.gguf' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
