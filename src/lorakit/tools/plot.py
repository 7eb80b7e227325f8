"""Saving matplotlib figures atomically (headless)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG atomically (never a half-written plot), at the tools' resolution."""
    return atomic.save_figure(fig, path, dpi=120)
