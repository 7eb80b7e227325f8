"""lorakit: LoRA fine-tuning on plain PyTorch, with PEFT-compatible adapter files.

import lorakit
cfg = lorakit.LoraConfig(r=16, alpha=32, targets="all-linear")
lorakit.add_adapter(model, cfg)                 # in place; base weights frozen
lorakit.save_adapter(model, "out/")             # PEFT's on-disk format
"""

from .adapters import (
    Adapter,
    ParamCount,
    active_adapters,
    adapter_records,
    add_adapter,
    delete_adapter,
    disable_adapters,
    get_adapter,
    set_adapter,
    trainable_parameters,
)
from .config import LoraConfig
from .io import AdapterFileError, load_adapter, save_adapter
from .merge import is_merged, merge, unload, unmerge
from .slots import RowSlots, per_row_adapters

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterFileError",
    "LoraConfig",
    "ParamCount",
    "RowSlots",
    "active_adapters",
    "adapter_records",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "get_adapter",
    "is_merged",
    "load_adapter",
    "merge",
    "per_row_adapters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
