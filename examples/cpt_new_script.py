"""Continued pre-training (CPT) on a script the base model has never seen, then SFT on top.

The corpus is simple English sentences written in a made-up alphabet: each letter a-z becomes one runic
character (U+16A0 + i). SmolLM2's byte-level tokenizer cuts each rune into 3 byte tokens it has hardly seen.

1. `lorakit train --mode cpt --new-tokens runes.txt`: the 26 runes become new tokens; only their embedding
   rows (and LoRA) train. (`--variant embeddings` trains the full embeddings instead: --train-embeddings.)
2. Held-out cost in nats per character (comparable across tokenizers) of the base model vs the CPT adapter.
3. `lorakit merge` the CPT adapter, then `lorakit train --mode sft` on the merged model: prompt "runes: <word
   in English>" -> the word in runes; held-out loss / exact match before and after.

    python examples/cpt_new_script.py --out runs/cpt_demo            # a few minutes on a laptop CPU

Writes <out>/summary.json and <out>/cpt_new_script.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import torch

SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the old man",
    "a small bird",
    "the farmer",
    "her brother",
    "the king",
]
VERBS = ["sees", "likes", "finds", "carries", "follows", "watches", "paints", "remembers"]
OBJECTS = [
    "the river",
    "a red apple",
    "the green hill",
    "a long road",
    "the house",
    "a wooden boat",
    "the moon",
]
ENDINGS = ["today", "at night", "in the morning", "with joy", "again", "near the sea", "every day", "slowly"]
WORDS = sorted({w for group in (SUBJECTS, VERBS, OBJECTS, ENDINGS) for p in group for w in p.split()})


def to_runes(text: str) -> str:
    return "".join(chr(0x16A0 + ord(c) - ord("a")) if "a" <= c <= "z" else c for c in text)


def make_data(out: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sentences = sorted(
        {f"{s} {v} {o} {e}." for s in SUBJECTS for v in VERBS for o in OBJECTS for e in ENDINGS}
    )
    rng.shuffle(sentences)
    held, train = sentences[:8], sentences[8:608]

    def write(name, rows):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # CPT rows: a few sentences per row, all in runes.
    write(
        "cpt_train.jsonl", [{"text": to_runes(" ".join(train[i : i + 4]))} for i in range(0, len(train), 4)]
    )
    write("cpt_eval.jsonl", [{"text": to_runes(s)} for s in held])
    (out / "runes.txt").write_text("".join(chr(0x16A0 + i) + "\n" for i in range(26)))
    # SFT rows: an English word -> the same word in runes (held-out words never seen in the SFT data).
    words = WORDS[:]
    rng.shuffle(words)
    sft = [{"prompt": f"runes: {w}", "completion": to_runes(w)} for w in words]
    write("sft_train.jsonl", sft[6:] * 4)
    write("sft_eval.jsonl", sft[:6])
    return {"held_out": [to_runes(s) for s in held]}


@torch.no_grad()
def nats_per_char(model, tokenizer, texts: list[str]) -> float:
    """Total NLL of `texts` over their characters: each text follows "\\n", so every character is predicted
    and the figure does not depend on how the tokenizer cuts the text."""
    model.eval()
    total, chars = 0.0, 0
    for text in texts:
        prefix = tokenizer("\n", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + tokenizer(text, add_special_tokens=False)["input_ids"]])
        logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total += float(nll)
        chars += len(text)
    return total / chars


def lorakit(*argv: str) -> None:
    cmd = [sys.executable, "-m", "lorakit", *argv]
    print("$ lorakit " + " ".join(argv), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/cpt_demo")
    ap.add_argument("--model", default="default")
    ap.add_argument("--variant", choices=("new-tokens", "embeddings"), default="new-tokens")
    ap.add_argument("--cpt-steps", type=int, default=16)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = make_data(out)["held_out"]

    from lorakit.models import load_model

    cached = out / "base_nats_per_char.json"  # the base model's figure, kept between runs of the example
    if cached.is_file() and json.loads(cached.read_text())["held_out"] == held:
        before = json.loads(cached.read_text())["nats_per_char"]
    else:
        base, base_tok = load_model(args.model)
        before = nats_per_char(base, base_tok, held)
        del base
        cached.write_text(json.dumps({"held_out": held, "nats_per_char": before}, ensure_ascii=False))
    print(f"base model, held-out runes: {before:.3f} nats/char", flush=True)

    cpt = out / "cpt"
    extra = ["--new-tokens", str(out / "runes.txt")]
    if args.variant == "embeddings":
        extra.append("--train-embeddings")
    lorakit(
        "train", "--model", args.model, "--mode", "cpt", "--data", str(out / "cpt_train.jsonl"),
        "--eval-data", str(out / "cpt_eval.jsonl"), "--output", str(cpt), "--steps", str(args.cpt_steps),
        "--lr", str(args.lr), "--batch-size", "4", "--max-len", "48", "--rank", "8", *extra,
    )  # fmt: skip
    model, tok = load_model(args.model, adapter=cpt)
    after = nats_per_char(model, tok, held)
    del model
    print(f"after CPT ({args.variant}): {after:.3f} nats/char", flush=True)

    merged = out / "cpt_merged"
    lorakit("merge", "--model", args.model, "--adapter", str(cpt), "--output", str(merged), "--overwrite")
    sft = out / "sft"
    lorakit(
        "train", "--model", str(merged), "--mode", "sft", "--data", str(out / "sft_train.jsonl"),
        "--eval-data", str(out / "sft_eval.jsonl"), "--output", str(sft), "--steps", str(args.sft_steps),
        "--lr", "2e-3", "--batch-size", "4", "--rank", "8",
    )  # fmt: skip
    sft_results = json.loads((sft / "results.json").read_text())
    cpt_results = json.loads((cpt / "results.json").read_text())
    summary = {
        "variant": args.variant,
        "held_out_nats_per_char": {"base": before, "cpt": after},
        "held_out_char_perplexity": {"base": math.exp(before), "cpt": math.exp(after)},
        "cpt_token_metrics": {"before": cpt_results["before"], "after": cpt_results["after"]},
        "cpt_train_seconds": cpt_results["train_seconds"],
        "sft_on_cpt": {"before": sft_results["before"], "after": sft_results["after"]},
        "sft_train_seconds": sft_results["train_seconds"],
    }
    for part in (summary["cpt_token_metrics"], summary["sft_on_cpt"]):
        for m in part.values():
            if m:
                m.pop("samples", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    plot(summary, out / "cpt_new_script.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    n = summary["held_out_nats_per_char"]
    axes[0].bar(["base", "after CPT"], [n["base"], n["cpt"]], color=["#999", "#2a7"])
    axes[0].set_ylabel("held-out nats / character")
    axes[0].set_title(f"CPT on an unseen script ({summary['variant']})")
    s = summary["sft_on_cpt"]
    axes[1].bar(
        ["before SFT", "after SFT"], [s["before"]["loss"], s["after"]["loss"]], color=["#999", "#27a"]
    )
    axes[1].set_ylabel("held-out loss / token")
    em = s["after"].get("exact_match")
    axes[1].set_title(f"SFT on the merged CPT model (exact match {em:.2f})" if em is not None else "SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
