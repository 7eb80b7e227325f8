"""Write the shipped DPO demo: src/lorakit/data/dpo_demo/{train,eval}.jsonl (deterministic; run from the repo root).

Built from the SFT demo (dates in words -> ISO 8601, held-out dates never seen in training): the prompt is the
system + user turns, "chosen" the ISO date, "rejected" what the default model does most often instead: echo the
date as it was written ("July 1, 1956" -> "July 1, 1956"; its greedy answer matches the ISO date on 1 of 64
held-out rows). 256 training pairs (the first of the SFT demo's training rows), 32 held-out pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data"
N_TRAIN, N_EVAL = 256, 32


def pair(row: dict) -> dict:
    *prompt, answer = row["messages"]
    return {"messages": prompt, "chosen": answer["content"], "rejected": prompt[-1]["content"]}


def main() -> None:
    out = ROOT / "dpo_demo"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        with open(ROOT / "demo" / f"{name}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:n]
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair(r)) + "\n" for r in rows)
        print(f"{out / name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
