"""Write the shipped GRPO demo: src/lorakit/data/grpo_demo/{train,eval}.jsonl (deterministic; run from the repo root).

A verifiable task: "What is A + B?" with A in 1..19, B in 1..9, and the sum as "answer" (the `exact` reward's
reference). The default model knows most of these sums but often does not say them within a few tokens
("To add 9 and 8, you simply add them together: ..."), so with a short --max-new-tokens the exact match of its
greedy answer is low and GRPO has something to learn. 32 held-out pairs never seen in training; the other 139
pairs train.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data" / "grpo_demo"
N_EVAL = 32


def main() -> None:
    pairs = [(a, b) for a in range(1, 20) for b in range(1, 10)]
    random.Random(0).shuffle(pairs)
    ROOT.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", pairs[:N_EVAL]), ("train", pairs[N_EVAL:])):
        rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in part]
        (ROOT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{ROOT / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
