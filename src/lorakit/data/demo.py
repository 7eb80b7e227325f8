"""The embedded demo dataset (what `lorakit train` with no data trains on). See scripts/make_demo_data.py."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).with_name("demo")

# TrainConfig overrides with which the demo learns on the default model (SmolLM2-135M-Instruct, fp32, CPU):
# rows are <= 47 tokens; 60 steps of 8 rows at lr 2e-3 (warmup + cosine) took the held-out exact match from
# 1.6 % to 100 % (measured: README, "Training data (lorakit.data) and the demo task").
DEMO_DEFAULTS: dict = {"steps": 60, "lr": 2e-3, "batch_size": 8, "rank": 16, "max_len": 128, "eval_every": 0}


def demo_paths() -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of the demo, shipped inside the package."""
    return DEMO_DIR / "train.jsonl", DEMO_DIR / "eval.jsonl"
