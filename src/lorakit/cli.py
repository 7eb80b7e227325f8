"""`lorakit` command line: a thin dispatcher. Each concern registers its own subcommands.

A command module exposes `register(subparsers)`, adding parsers whose `func(args) -> int` does the work by
calling the library.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys

# Concern packages that contribute subcommands, in help order.
COMMAND_MODULES = (
    "lorakit.train.commands",
    "lorakit.serve.commands",
    "lorakit.tools.commands",
    "lorakit.gguf.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning on plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"lorakit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if (
            importlib.util.find_spec(name.rpartition(".")[0]) is None
            or importlib.util.find_spec(name) is None
        ):
            continue
        importlib.import_module(name).register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown flag of a subcommand is reported with that subcommand's usage and the
    closest flag it has (argparse reports it with the top-level usage and no hint)."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    command = _subparsers(parser).get(getattr(args, "command", None) or "")
    target = command or parser
    flags = [s for a in target._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for arg in extra:
        close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.6)
        if arg.startswith("-") and close:
            hints.append(f"{arg} (did you mean {close[0]}?)")
        else:
            hints.append(arg)
    target.error(f"unrecognized arguments: {' '.join(hints)}")
    raise AssertionError("unreachable: error() exits")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    # The CLI never downloads (models.load_model passes local_files_only): no hub calls from this process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError, ImportError) as err:
        # Errors the library raises for bad input carry a message meant for the user: no traceback. OSError:
        # a path the user gave (permissions, a directory for a file, a full disk); ImportError: a missing extra.
        print(f"lorakit: error: {_message(err)}", file=sys.stderr)
        return 1


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # str(KeyError) would add quotes around the message
    if isinstance(err, RecursionError):
        return "input nested too deeply (maximum recursion depth exceeded)"
    return str(err) or type(err).__name__


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
