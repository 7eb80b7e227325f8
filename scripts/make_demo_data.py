"""Write the embedded demo dataset: src/lorakit/data/demo/{train,eval}.jsonl (deterministic; run from the repo root).

The task: rewrite a date written in words ("14 March 2021", "March 14, 2021") as ISO 8601 ("2021-03-14"). It has
a rule to learn (month names to numbers, zero padding, field order), the held-out rows are dates never seen in
training, and the answers are short enough for a 135M model to produce exactly.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

SYSTEM = "Convert the date to ISO 8601."
MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
N_TRAIN, N_EVAL, SEED = 2000, 64, 1234
OUT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data" / "demo"


def spoken(d: datetime.date, style: int) -> str:
    month = MONTHS[d.month - 1]
    return f"{d.day} {month} {d.year}" if style == 0 else f"{month} {d.day}, {d.year}"


def row(d: datetime.date, style: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": spoken(d, style)},
            {"role": "assistant", "content": d.isoformat()},
        ]
    }


def main() -> None:
    rng = random.Random(SEED)
    start, span = datetime.date(1950, 1, 1), (datetime.date(2049, 12, 31) - datetime.date(1950, 1, 1)).days
    # Distinct dates: no held-out date appears in training.
    days = rng.sample(range(span + 1), N_TRAIN + N_EVAL)
    rows = [row(start + datetime.timedelta(days=n), rng.randrange(2)) for n in days]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:N_TRAIN]), ("eval", rows[N_TRAIN:])):
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"{OUT / name}.jsonl: {len(part)} rows")


if __name__ == "__main__":
    main()
