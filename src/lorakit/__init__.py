"""lorakit: LoRA fine-tuning on plain PyTorch, with PEFT-compatible adapter files.

import lorakit
cfg = lorakit.LoraConfig(r=16, alpha=32, targets="all-linear")
lorakit.add_adapter(model, cfg)                 # in place; base weights frozen
lorakit.save_adapter(model, "out/")             # PEFT's on-disk format
"""

from ._lazy import attach

# The public names load their modules on first use (PEP 562), so `lorakit --help` and `import lorakit` do
# not pay for importing torch / transformers until something needs them.
_LAZY = {
    **dict.fromkeys(
        ("Adapter", "ParamCount", "active_adapters", "adapter_records", "add_adapter", "delete_adapter",
         "disable_adapters", "get_adapter", "set_adapter", "trainable_parameters"),
        "adapters",
    ),
    "LoraConfig": "config",
    **dict.fromkeys(("RowSlots", "per_row_adapters"), "slots"),
    **dict.fromkeys(("AdapterFileError", "load_adapter", "save_adapter"), "io"),
    **dict.fromkeys(("is_merged", "merge", "unload", "unmerge"), "merge"),
}  # fmt: skip


attach(__name__, _LAZY)

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
