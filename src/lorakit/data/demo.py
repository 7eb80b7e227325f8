"""The embedded demo dataset (what `lorakit train` with no data trains on). See scripts/make_demo_data.py."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).with_name("demo")

# TrainConfig overrides with which the demo learns on the default model (measured: see README, "Data").
DEMO_DEFAULTS: dict = {}


def demo_paths() -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of the demo, shipped inside the package."""
    return DEMO_DIR / "train.jsonl", DEMO_DIR / "eval.jsonl"
