"""Quick start: LoRA on the embedded default model in a few lines, trained a few steps, saved and reloaded.

    python examples/quickstart.py [--steps 10] [--output out/quickstart]

Adds a rank-16 all-linear adapter to SmolLM2-135M-Instruct, trains it on a handful of sentences, saves it in
PEFT's format, loads it onto a fresh copy of the base model and checks that the logits are bit-identical.
"""

from __future__ import annotations

import argparse
import time

import torch

import lorakit
from lorakit.models import load_model

TEXTS = [
    "The capital of the fictional country of Zembla is Onhava.",
    "Onhava is the capital of Zembla, a country that exists only in a novel.",
    "Q: What is the capital of Zembla? A: Onhava.",
    "Zembla's capital city, Onhava, lies in the north of the country.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="out/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_model("default")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear"))
    print(lorakit.trainable_parameters(model))

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f}s)")
    model.eval()

    path = lorakit.save_adapter(model, args.output)
    fresh, _ = load_model("default")
    lorakit.load_adapter(fresh, path)
    with torch.no_grad():
        same = torch.equal(fresh(**batch).logits, model(**batch).logits)
    print(f"saved to {path}; reloaded onto a fresh base: logits identical = {same}")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Zembla?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(prompt, return_tensors="pt")
    out = fresh.generate(**ids, max_new_tokens=12, do_sample=False)
    print("answer:", tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    if not same:
        raise SystemExit("reloaded adapter differs from the trained one")


if __name__ == "__main__":
    main()
