"""What a training run recorded beside its adapter, as defaults for commands that use that adapter.

`lorakit eval --adapter RUN` evaluates as the run trained: its `train_config.yaml` supplies max_len and mode
(a CPT run's loss is only comparable over blocks of the same length), its saved chat template
(`chat_template.jinja`) and its system prompt. Flags given on the command line win.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_NAME = "train_config.yaml"


def run_config(adapter_dir: str | os.PathLike | None) -> dict:
    """The options saved in `adapter_dir/train_config.yaml` ({} when there is none or it is unreadable:
    an adapter from PEFT or another tool has none, and the commands then use their own defaults)."""
    if adapter_dir is None:
        return {}
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def fill(args, adapter_dir, names: dict[str, str], fallback: dict) -> list[str]:
    """Set each `args.<attr>` that is None from the run's option `names[attr]`, else from `fallback[attr]`.

    Returns "attr value" strings for the options taken from the run (to tell the user).
    """
    saved = run_config(adapter_dir)
    taken = []
    for attr, option in names.items():
        if getattr(args, attr, None) is not None:
            continue
        if saved.get(option) is not None:
            setattr(args, attr, saved[option])
            taken.append(f"--{attr.replace('_', '-')} {saved[option]}")
        else:
            setattr(args, attr, fallback.get(attr))
    return taken


SYSTEM_NAME = "system_prompt.txt"


def common_system(rows: list[dict], fmt: str) -> str | None:
    """The system prompt every training row shares (the demo's "Convert the date to ISO 8601."), else None.

    A run trained under one system prompt answers best under it, so `lorakit generate` of its adapter uses it
    by default; rows with different (or no) system prompts give None.
    """
    from ..data.formats import as_messages

    found = set()
    for row in rows:
        if fmt not in ("messages", "prompt"):
            return None
        messages = as_messages(row, fmt)
        first = messages[0] if messages else {}
        found.add(first.get("content") if first.get("role") == "system" else None)
        if len(found) > 1:
            return None
    value = next(iter(found), None)
    return value if isinstance(value, str) and value else None


def saved_system(adapter_dir: str | os.PathLike | None) -> str | None:
    """The system prompt a run saved beside its adapter (`system_prompt.txt`), if any."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / SYSTEM_NAME
    return path.read_text() if path.is_file() else None
