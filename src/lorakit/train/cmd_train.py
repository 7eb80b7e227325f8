"""`lorakit train [CONFIG.yaml] [--flags]`: a thin layer over `lorakit.train.run`.

Options resolve as: the demo's defaults (only when no data is given), then CONFIG.yaml, then the flags
given on the command line. With no arguments at all it trains the embedded demo on the default model and
prints held-out metrics before and after.
"""

from __future__ import annotations

import argparse
import sys

from ..config import INIT_METHODS
from .config import DISTRIBUTED, LOSS_TYPES, MODES, OPTIMIZERS, QUANTIZE, SCHEDULERS, TRACKERS, TrainConfig


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter (no arguments: the embedded demo on the default model)",
        description=__doc__.split("\n\n", 1)[1]
        + " The defaults below are those of a run with --data; without it, the demo's (lorakit.data.DEMO_DEFAULTS).",
    )
    add_train_arguments(p)
    p.set_defaults(func=main)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a training run (shared with `lorakit sweep`); all default to None = not given."""
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="options as YAML; flags override it")
    _data_and_adapter_arguments(p)
    _optimisation_arguments(p)
    _objective_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, help="steps between held-out loss evaluations (0: at the end)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (0: none)")
    g.add_argument("--log-every", type=int, help="steps between progress lines when not on a terminal")
    g.add_argument("--resume", action="store_true", default=None, help="continue from OUTPUT/checkpoint")
    g.add_argument(
        "--distributed", choices=DISTRIBUTED, help="under torchrun: ddp (default) or fsdp (base sharded)"
    )
    add_everyday_arguments(p)
    _show_defaults(p)


def _data_and_adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="'default', a local HF model directory or a .gguf file")
    g.add_argument("--data", help="training rows: .jsonl, .csv or .parquet (none: the embedded demo)")
    g.add_argument("--eval-data", help="held-out rows, evaluated before and after training")
    g.add_argument("--output", help="directory for the adapter, checkpoints and records")
    g.add_argument(
        "--mode",
        choices=MODES,
        help="sft: chat / prompt-completion rows; cpt: raw text; dpo / orpo / kto: preferences; grpo: prompts "
        "and --reward functions",
    )
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


def _optimisation_arguments(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--loss-chunk",
        type=int,
        help="cross-entropy this many tokens at a time, loss tokens only (default 1024; 0: all logits at once)",
    )
    g.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=None,
        help="pack rows into sequences of up to --max-len tokens, attention kept per row (default: on when "
        "the model keeps packed rows apart; --no-packing: pad every micro-batch)",
    )  # fmt: skip
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (training)")
    g.add_argument(
        "--recompute-inputs", action=argparse.BooleanOptionalAction, default=None,
        help="rebuild each LoRA layer's input in backward from what the base keeps; "
        "--no-recompute-inputs: save it (more memory, faster on some machines)",
    )  # fmt: skip
    g.add_argument(
        "--offload-activations", action="store_true", default=None,
        help="keep what backward needs in CPU memory during the step (GPU training; refused on cpu)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, help="seed of the adapter init, data order and dropout")


def _objective_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preference (dpo, orpo, kto)")
    g.add_argument("--beta", type=float, help="preference strength beta (default 0.1)")
    g.add_argument("--loss-type", choices=LOSS_TYPES, help="dpo: sigmoid (DPO), ipo or hinge")
    g.add_argument(
        "--precompute-ref",
        action="store_true",
        default=None,
        help="reference log-probs once, before training",
    )
    g.add_argument("--desirable-weight", type=float, help="kto: weight of desirable rows")
    g.add_argument("--undesirable-weight", type=float, help="kto: weight of undesirable rows")
    g = p.add_argument_group("grpo (prompts scored by reward functions; --beta: KL weight, 0: none)")
    g.add_argument(
        "--reward", action="append", metavar="SPEC",
        help="repeatable, scores summed: exact, exact:FIELD, regex:PATTERN, module:function, file.py:function",
    )  # fmt: skip
    g.add_argument("--num-generations", type=int, help="completions sampled per prompt (the group)")
    g.add_argument("--temperature", type=float, help="the rollouts' sampling temperature")
    g.add_argument("--max-new-tokens", type=int, help="the longest completion, in tokens")
    g.add_argument(
        "--grpo-iterations", type=int, metavar="MU", help="optimizer updates per rollout batch (default 1)"
    )
    g.add_argument("--epsilon", type=float, help="clip the ratio to [1 - epsilon, 1 + epsilon] (default 0.2)")
    g.add_argument("--epsilon-high", type=float, help="the clip's upper epsilon (default: --epsilon)")


def add_everyday_arguments(p: argparse.ArgumentParser) -> None:
    """Device, overwrite, tracking, chat template, optimizer and schedule (issue 16); default None = not given."""
    g = p.add_argument_group("device, records, chat template, optimizer")
    g.add_argument("--device", help="auto: this process's CUDA device if any, else cpu; or cpu, cuda, cuda:N")
    g.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a finished run in --output"
    )
    g.add_argument(
        "--report-to", metavar="T1,T2", help=f"experiment trackers, offline: {', '.join(TRACKERS)}"
    )
    g.add_argument("--chat-template", metavar="FILE|NAME", help="a Jinja template file or a shipped name")
    g.add_argument("--truncate", action="store_true", default=None, help="cut SFT rows longer than --max-len")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw8bit needs bitsandbytes")
    g.add_argument("--scheduler", choices=SCHEDULERS, help="the lr after warmup")
    g.add_argument("--lora-plus-ratio", type=float, metavar="RATIO", help="LoRA+: B's lr = lr x RATIO")
    g.add_argument(
        "--init",
        choices=(*INIT_METHODS, "eva"),
        help="adapter init; pissa / olora / loftq derive A, B from W; eva: A from the data's layer inputs",
    )


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Append TrainConfig's default to each option's help (the flags default to None = not given, so
    argparse's own %(default)s would print None)."""
    fields = TrainConfig.__dataclass_fields__
    for action in p._actions:
        field = fields.get(action.dest)
        if field is None or action.help is None or field.default is None or field.default is False:
            continue
        action.help += f" (default {field.default})"


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
    from .prepare import check_output

    cfg = resolve(args)
    check_output(cfg)
    results = run(cfg)
    if not results:  # not rank 0 of a multi-process run
        return 0
    before, after = results["before"], results["after"]
    if before and after:
        print(f"held-out ({after['n']} rows)      before    after")
        for key in (
            "loss",
            "perplexity",
            "reward_accuracy",
            "preference_accuracy",
            "reward_margin",
            "reward",
            "exact_match",
        ):
            if before.get(key) is not None and after.get(key) is not None:
                print(f"  {key:<20} {before[key]:>9.4f} {after[key]:>8.4f}")
    print(
        f"trained {results['steps']} steps in {results['train_seconds']:.1f} s "
        f"({results['tokens_per_second']:,.0f} tokens/s); adapter in {cfg.output}"
    )
    sys.stdout.flush()
    return 0
