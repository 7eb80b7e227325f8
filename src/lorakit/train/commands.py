"""Registers the training concern's subcommands; each lives in its own `cmd_<name>.py`."""

from __future__ import annotations


def register(sub) -> None:
    """Add this concern's subcommands to the `lorakit` parser's subparsers."""
    # Each command module is imported here explicitly, in help order.
    from . import cmd_eval, cmd_generate, cmd_merge, cmd_sweep, cmd_train

    cmd_train.register(sub)
    cmd_eval.register(sub)
    cmd_generate.register(sub)
    cmd_merge.register(sub)
    cmd_sweep.register(sub)
