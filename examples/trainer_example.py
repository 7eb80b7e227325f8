"""lorakit inside Hugging Face's `transformers.Trainer`: add_adapter, Trainer.train, save_adapter.

lorakit adapters are plain nn.Parameters on the model (base weights frozen), so Trainer needs nothing special:
its optimizer sees only the trainable parameters. Save with lorakit.save_adapter (PEFT's format), not with
Trainer.save_model (which would write the whole model).

    python examples/trainer_example.py --output runs/trainer_example           # the default model
    python examples/trainer_example.py --model DIR --steps 2 --output /tmp/x   # any local HF model
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]
    }
    for a in range(2, 9)
    for b in range(3, 7)
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--output", default="runs/trainer_example")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    import lorakit
    from lorakit.data import collate, load_dataset
    from lorakit.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, targets="all-linear"))
    print(lorakit.trainable_parameters(model))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        data = load_dataset(path, tokenizer, mode="sft", max_len=128)  # loss on the answers only

    training_args = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=args.lr,
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the dataset holds lorakit Examples; the collator builds the batch
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.examples,
        data_collator=lambda examples: collate(examples, tokenizer.pad_token_id),
    )
    result = trainer.train()
    out = lorakit.save_adapter(model, args.output)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter saved to {out}")
    return {"losses": losses, "train_loss": result.training_loss, "adapter": str(out)}


if __name__ == "__main__":
    main()
