"""Prompt rows for GRPO: a prompt to sample completions for, and the fields the reward functions read.

Row format (JSONL / CSV / Parquet, read by `read_rows`, every error naming FILE:LINE):
    {"prompt": str | "messages": [the conversation so far, ending with a user turn] (a list "prompt" reads as
     "messages"), "system": str (optional, with a string "prompt"), any other fields, e.g. "answer"}

The prompt is tokenized as SFT tokenizes the prompt part of a row (`formats.encode_sft`): with a chat template,
the conversation rendered with the generation prompt; without, the raw prompt text. Every field other than
the prompt is handed to the reward functions (TRL's reward kwargs: one list per field, aligned with the
completions). A prompt longer than `max_len - max_new_tokens` is an error, never truncated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .dataset import Dataset
from .formats import render, shown
from .rows import DataError, read_rows, require_rows

PROMPT_KEYS = ("prompt", "messages", "system")


@dataclass
class PromptExample:
    """One prompt row: its token ids, the prompt as the reward functions see it, and its other fields.

    prompt: the row's prompt string, or its conversation (a list of messages) for "messages" rows.
    fields: every other field of the row ("answer", ...), passed to the reward functions by name.
    """

    prompt_ids: list[int]
    prompt: str | list[dict]
    fields: dict = field(default_factory=dict)

    @property
    def answer(self):
        return self.fields.get("answer")

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)


def load_prompts(
    path: str | os.PathLike,
    tokenizer,
    max_len: int = 512,
    max_new_tokens: int = 64,
    required: tuple[str, ...] = (),
    skip_bad_rows: bool = False,
) -> Dataset:
    """Read and tokenize a file of prompt rows.

    Args:
        required: fields every row must have (the reference field of an `exact` reward, e.g. "answer").
    Returns:
        a Dataset of PromptExample, format "messages" or "prompt" (the first row's).
    Raises:
        FileNotFoundError: no such file.
        DataError: "FILE:LINE: what is wrong; expected ...": a missing or malformed prompt, a missing required
            field, a prompt that leaves fewer than `max_new_tokens` of `max_len`, or no usable rows.
    """
    path = str(path)
    rows, examples, reasons, fmt = [], [], [], None
    for where, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            ex, kind = _encode(row, tokenizer, where)
            for name in required:
                if row.get(name) is None or (isinstance(row.get(name), str) and not row[name].strip()):
                    raise DataError(
                        f"{where}: field {name!r} is {shown(row.get(name))}; expected the reference the "
                        f"reward compares completions with"
                    )
            if len(ex.prompt_ids) + max_new_tokens > max_len:
                raise DataError(
                    f"{where}: the prompt is {len(ex.prompt_ids)} tokens, and with max_new_tokens={max_new_tokens} "
                    f"longer than max_len={max_len}; raise max_len or shorten the prompt (never truncated)"
                )
            examples.append(ex)
            rows.append(row)
            fmt = fmt or kind
        except DataError as err:
            if not skip_bad_rows:
                raise
            reasons.append(str(err))
    require_rows(path, rows, reasons)
    return Dataset(examples, rows, fmt, len(reasons), path, reasons[:20])


def _encode(row: dict, tokenizer, where: str) -> tuple[PromptExample, str]:
    fields = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    messages = row.get("messages", row.get("prompt"))
    if isinstance(messages, list):
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(
                f"{where}: field 'messages' is {shown(messages)}; expected the conversation so far, a list of "
                "{'role': str, 'content': str}"
            )
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the conversation ends with an assistant turn; expected it to end "
                            "with the turn to answer (user)")  # fmt: skip
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{where}: 'messages' rows need a tokenizer with a chat template and this one has none; use "
                "'prompt' rows or a chat model"
            )
        text = render(tokenizer, messages, True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return PromptExample(ids, messages, fields), "messages"
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{where}: field 'prompt' is {shown(prompt)} and there is no 'messages'; expected a prompt string "
            "or the conversation so far"
        )
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' is {shown(system)}; expected a string")
    if getattr(tokenizer, "chat_template", None):
        conv = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer(render(tokenizer, conv, True), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return PromptExample(ids, prompt, fields), "prompt"
