"""`lorakit sweep --ranks 4 8 16 [train options]`: one training run per rank (train/sweep.py); a training
command, so it lives with training (the adapter tools need no base model)."""

from __future__ import annotations

from . import cmd_train
from .config import TrainConfig


def register(sub) -> None:
    """`lorakit sweep --ranks 4 8 16 [train options]`: the train command's own options (one definition,
    from `lorakit.train.cmd_train.add_train_arguments`), plus --ranks."""
    description = (
        "Train one adapter per rank with the same data, steps and seed (the options of `lorakit train`), "
        "then print and plot held-out metric and trainable parameters against rank. --output is the "
        "sweep's root (default runs/sweep): OUTPUT/r<rank>/ per run, OUTPUT/sweep.json and OUTPUT/sweep.png."
    )

    p = sub.add_parser("sweep", help="train each rank on the same data; metric and size against rank",
                       description=description)  # fmt: skip
    cmd_train.add_train_arguments(p)
    p.add_argument(
        "--ranks", type=int, nargs="+", required=True, help="the ranks to train, e.g. 4 8 16 32 64"
    )
    p.add_argument("--retrain", action="store_true", help="train every rank again, even one already done")
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from .sweep import format_table, sweep

    if args.rank is not None:
        raise ValueError("sweep: give the ranks with --ranks, not --rank")
    if args.resume:
        raise ValueError(
            "sweep: --resume does not apply; a sweep reuses the ranks already done unless --retrain"
        )
    base = cmd_train.resolve(args)
    # The sweep's root: --output, else the config file's output, else runs/sweep (not train's default).
    output = args.output or (base.output if base.output != TrainConfig.output else "runs/sweep")
    summary = sweep(base, args.ranks, output, reuse=not args.retrain)
    print(format_table(summary))
    print(f"wrote {output}/sweep.json and {output}/sweep.png")
    return 0
