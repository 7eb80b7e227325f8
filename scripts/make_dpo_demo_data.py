"""Write the shipped DPO demo: src/lorakit/data/dpo_demo/{train,eval}.jsonl (deterministic; run from the repo root).

Built from the SFT demo (dates in words -> ISO 8601, held-out dates never seen in training): the prompt is the
system + user turns, "chosen" the ISO date, "rejected" one of the answers the default model gives instead (its
greedy answer matches on 1 of the 64 held-out rows of the SFT demo), in turn: the date echoed as written
("July 1, 1956"), the ISO date followed by chatter it does not stop ("1956-07-01\n\nThe date July 1, 1956 in ISO
8601 format is 1956-07-01."), or a sentence ("The date July 1, 1956 is 1956-07-01."). 256 training pairs (the
first of the SFT demo's training rows), 32 held-out pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data"
N_TRAIN, N_EVAL = 256, 32


def pair(i: int, row: dict) -> dict:
    *prompt, answer = row["messages"]
    spoken, iso = prompt[-1]["content"], answer["content"]
    rejected = [
        spoken,
        f"{iso}\n\nThe date {spoken} in ISO 8601 format is {iso}.",
        f"The date {spoken} is {iso}.",
    ][i % 3]
    return {"messages": prompt, "chosen": iso, "rejected": rejected}


def main() -> None:
    out = ROOT / "dpo_demo"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        with open(ROOT / "demo" / f"{name}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:n]
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair(i, r)) + "\n" for i, r in enumerate(rows))
        print(f"{out / name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
