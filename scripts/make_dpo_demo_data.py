"""Write the shipped DPO demo: src/lorakit/data/dpo_demo/{train,eval}.jsonl (deterministic; run from the repo root).

The task: "Reply with only the person's name." on a one-sentence story ("Yesterday Tom fixed the old
bicycle."); chosen: the name alone ("Tom"); rejected, in turn, the four things the default model
(SmolLM2-135M-Instruct) does instead: echo the sentence, answer in a sentence ("The person's name is Tom."),
give the name and keep talking ("Tom\n\nYesterday Tom fixed the old bicycle."), or give another name (one not
in the sentence: a first DPO run without these learnt the one-word format but then named someone else on most
held-out rows, "Eleanor" for Farah). The held-out rows use names, sentence templates and objects that never
occur in training, so a held-out hit is the learnt behaviour, not a memorised row. 192 training pairs, 32
held-out pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data"
SYSTEM = "Reply with only the person's name."
N_TRAIN, N_EVAL = 192, 32

TRAIN_NAMES = (
    "Maria Tom Priya Kenji Anna Omar Lucas Sofia Ivan Mei Carlos Fatima Noah Elena Raj Chloe Diego Hana Samuel "
    "Leila Peter Aisha Jonas Yuki Marco Nadia Felix Rosa Ahmed Clara Victor Ingrid Paulo Zara Hugo Amara Theo "
    "Lina Oscar Mira"
).split()
EVAL_NAMES = "Beatrice Kwame Svetlana Tariq Ophelia Rafael Ngozi Henrik Dalia Mateo Farah Gustav".split()
TRAIN_TEMPLATES = (
    "{name} bought {thing} at the market.",
    "Yesterday {name} fixed {thing}.",
    "The letter about {thing} was written by {name}.",
    "After lunch, {name} went looking for {thing}.",
    "Everyone agreed that {name} had found {thing}.",
    "{name} forgot {thing} on the train.",
    "On Sunday morning {name} painted {thing}.",
    "It was {name} who sold {thing} to the neighbours.",
    "Last winter {name} lost {thing} in the snow.",
    "The teacher gave {thing} to {name}.",
    "{name} carried {thing} up the hill.",
    "Nobody expected {name} to return {thing}.",
)
EVAL_TEMPLATES = (
    "In the evening {name} cleaned {thing}.",
    "The neighbours borrowed {thing} from {name}.",
    "{name} wrapped {thing} as a present.",
    "Before dawn, {name} hid {thing} in the garden.",
)
TRAIN_THINGS = (
    "three apples|the old bicycle|a red umbrella|the kitchen table|a small boat|the broken clock|a blue kite|"
    "the garden gate|a wooden chair|the family car|a box of books|the front door"
).split("|")
EVAL_THINGS = "a silver teapot|the green lantern|a violin|the map of the city".split("|")


def pair(i: int, name: str, sentence: str, other: str) -> dict:
    rejected = [sentence, f"The person's name is {name}.", f"{name}\n\n{sentence}", other][i % 4]
    return {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence}],
        "chosen": name,
        "rejected": rejected,
    }


def rows(n: int, names, templates, things, seed: int) -> list[dict]:
    """`n` rows of (name, template, thing) combinations in a seeded order; "other" is another of `names`."""
    rng = random.Random(seed)
    combos = [(a, t, b) for a in names for t in templates for b in things]
    rng.shuffle(combos)
    others = [
        names[(names.index(a) + 1 + i % (len(names) - 1)) % len(names)]
        for i, (a, _, _) in enumerate(combos[:n])
    ]
    return [pair(i, a, t.format(name=a, thing=b), o) for i, ((a, t, b), o) in enumerate(zip(combos, others))]


def main() -> None:
    out = ROOT / "dpo_demo"
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": rows(N_TRAIN, TRAIN_NAMES, TRAIN_TEMPLATES, TRAIN_THINGS, 0),
        "eval": rows(N_EVAL, EVAL_NAMES, EVAL_TEMPLATES, EVAL_THINGS, 1),
    }
    for name, split in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in split)
        print(f"{out / name}.jsonl: {len(split)} pairs")


if __name__ == "__main__":
    main()
