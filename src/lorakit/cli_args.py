"""Arguments several subcommands share, defined once so they read and behave the same everywhere."""

from __future__ import annotations

import argparse

DEVICE_HELP = "auto (default): CUDA when available, else cpu; or cpu, cuda, cuda:N"
FINGERPRINT_HELP = (
    "load the adapter even if its base-model fingerprint differs from this base's (the adapter was trained "
    "on other weights of the same architecture)"
)


def add_device(p: argparse.ArgumentParser) -> None:
    """`--device`, default "auto" (see lorakit.models.resolve_device)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_ignore_fingerprint(p: argparse.ArgumentParser) -> None:
    """`--ignore-fingerprint`: the CLI form of load_adapter(..., ignore_fingerprint=True)."""
    p.add_argument("--ignore-fingerprint", action="store_true", help=FINGERPRINT_HELP)
