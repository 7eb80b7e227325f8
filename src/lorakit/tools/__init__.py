"""Adapter tools working on adapter files, no base model needed: inspect, resize, combine, convert
(the rank sweep trains, so it is lorakit.train.sweep).

Each lives in its own module; `commands.py` is the thin CLI. All ΔW math goes through `lorakit.functional`.
"""

from .._lazy import attach

attach(
    __name__, {"combine": "combine", "convert": "convert", "inspect_adapter": "inspect", "resize": "resize"}
)

__all__ = ["combine", "convert", "inspect_adapter", "resize"]
