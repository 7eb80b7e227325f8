"""`lorakit train [CONFIG.yaml] [--flags]`: a thin layer over `lorakit.train.run`.

Options resolve as: the demo's defaults (only when no data is given), then CONFIG.yaml, then the flags
given on the command line. With no arguments at all it trains the embedded demo on the default model and
prints held-out metrics before and after.
"""

from __future__ import annotations

import argparse
import sys

from .config import DISTRIBUTED, MODES, QUANTIZE, TrainConfig


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter (no arguments: the embedded demo on the default model)",
        description=__doc__.split("\n\n", 1)[1],
    )
    add_train_arguments(p)
    p.set_defaults(func=main)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a training run (shared with `lorakit sweep`); all default to None = not given."""
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="options as YAML; flags override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="'default', a local HF model directory or a .gguf file")
    g.add_argument("--data", help="training rows: .jsonl, .csv or .parquet (none: the embedded demo)")
    g.add_argument("--eval-data", help="held-out rows, evaluated before and after training")
    g.add_argument("--output", help="directory for the adapter, checkpoints and records")
    g.add_argument("--mode", choices=MODES, help="sft: chat / prompt-completion rows; cpt: raw text")
    g.add_argument("--max-len", type=int, help="tokens per row (sft) or packed block (cpt)")
    g.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip malformed rows")
    g.add_argument("--quantize", choices=QUANTIZE, help="base weights in 4-bit NF4 (QLoRA) or 8-bit")
    g.add_argument("--dtype", help="base weight dtype (bf16, fp16, fp32)")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, help="LoRA rank r")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--dropout", type=float, help="dropout on the LoRA branch input")
    g.add_argument("--targets", help="'all-linear', comma-separated module names, or a regex")
    g.add_argument(
        "--train-embeddings", action="store_true", default=None, help="cpt: train embeddings + head"
    )
    g.add_argument("--new-tokens", metavar="FILE", help="add these tokens (one per line); their rows train")
    g.add_argument(
        "--target-parameters",
        help="parameters to adapt too, e.g. fused MoE experts: mlp.experts.down_proj,...",
    )
    g = p.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--warmup", type=float, help="warmup, as a fraction of the steps; then cosine decay")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (0: off)")
    g.add_argument("--batch-size", type=int, help="rows per micro-batch (per process)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="recompute activations"
    )
    g.add_argument("--loss-chunk", type=int, help="cross-entropy this many tokens at a time (0: all)")
    g.add_argument("--seed", type=int, help="seed of the adapter init, data order and dropout")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, help="steps between held-out loss evaluations (0: at the end)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (0: none)")
    g.add_argument("--log-every", type=int, help="steps between progress lines when not on a terminal")
    g.add_argument("--resume", action="store_true", default=None, help="continue from OUTPUT/checkpoint")
    g.add_argument(
        "--distributed", choices=DISTRIBUTED, help="under torchrun: ddp (default) or fsdp (base sharded)"
    )


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig from parsed arguments (see the module docstring for the order)."""
    from .config import read_yaml

    fields = TrainConfig.__dataclass_fields__
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given = {**(read_yaml(args.config) if args.config else {}), **overrides}
    defaults = None
    if given.get("data") is None:
        from lorakit.data import DEMO_DEFAULTS

        defaults = dict(DEMO_DEFAULTS)
    return TrainConfig.resolve(args.config, overrides, defaults)


def main(args: argparse.Namespace) -> int:
    from .loop import run

    cfg = resolve(args)
    results = run(cfg)
    if not results:  # not rank 0 of a multi-process run
        return 0
    before, after = results["before"], results["after"]
    if before and after:
        print(f"held-out ({after['n']} rows)      before    after")
        for key in ("loss", "perplexity", "exact_match"):
            if before.get(key) is not None and after.get(key) is not None:
                print(f"  {key:<20} {before[key]:>9.4f} {after[key]:>8.4f}")
    print(
        f"trained {results['steps']} steps in {results['train_seconds']:.1f} s "
        f"({results['tokens_per_second']:,.0f} tokens/s); adapter in {cfg.output}"
    )
    sys.stdout.flush()
    return 0
