"""Adapter files: PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`)."""

from .files import AdapterFileError, AdapterFiles, adapter_dir, read_adapter, write_adapter
from .load import PreparedAdapter, load_adapter, load_prepared, prepare_adapter
from .save import save_adapter

__all__ = [
    "AdapterFileError",
    "AdapterFiles",
    "adapter_dir",
    "PreparedAdapter",
    "load_adapter",
    "load_prepared",
    "prepare_adapter",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]
