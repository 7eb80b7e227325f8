"""load_dataset: a data file to token ids and labels, with errors that name the file and line; collate."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .formats import Example, check_row, detect_format, encode_sft, pack_text, with_system
from .rows import DataError, read_rows, require_rows

MODES = ("sft", "cpt")


@dataclass
class Dataset:
    """Tokenized rows of one file.

    examples: the training sequences (for "text" data, packed blocks; otherwise one per row, aligned with rows).
    rows: the raw rows kept (bad rows skipped). format: "messages", "prompt" or "text". skipped: bad rows skipped
    (only with skip_bad_rows). path: the file. skipped_reasons: the first messages of the skipped rows.
    """

    examples: list[Example]
    rows: list[dict]
    format: str
    skipped: int
    path: str
    skipped_reasons: list[str] = field(default_factory=list)
    truncated: int = 0  # SFT rows cut to max_len (truncate=True)

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(
    path: str | os.PathLike,
    tokenizer,
    mode: str = "sft",
    max_len: int = 512,
    skip_bad_rows: bool = False,
    truncate: bool = False,
    system: str | None = None,
) -> Dataset:
    """Read and tokenize a JSONL / CSV / Parquet file. The format is detected from the file's first row.

    Args:
        path: the data file (.jsonl/.json, .csv or .parquet).
        tokenizer: a Hugging Face tokenizer (a chat template is needed for "messages" rows).
        mode: "sft" for "messages" or "prompt"/"completion" rows (loss on answers only), "cpt" for "text" rows
            (packed into blocks of `max_len`, loss on every token).
        max_len: the longest SFT row in tokens, or the CPT block length. A longer SFT row is an error naming
            every too-long row (their count and the first few FILE:LINE), unless `truncate` or `skip_bad_rows`.
        skip_bad_rows: skip and count bad or too long rows instead of raising at the first.
        truncate: cut SFT rows longer than `max_len` to their first `max_len` tokens (counted in `truncated`;
            the loss covers the answer tokens that remain).
        system: a system prompt for the SFT rows that have none (`lorakit eval` of a run: the run's prompt).

    Raises:
        FileNotFoundError: no such file.
        DataError: "FILE:LINE: what is wrong; expected ...", for a bad row (unless skipped), a row of another
            format than the file's first, a format that does not fit `mode`, or a file with no usable rows.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {MODES}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len={max_len!r} is invalid: expected an integer >= 2")
    path = str(path)
    fmt: str | None = None
    rows: list[dict] = []
    examples: list[Example] = []
    reasons: list[str] = []
    too_long: list[tuple[str, int]] = []  # (FILE:LINE, tokens) of SFT rows over max_len
    truncated = 0

    for where, row in read_rows(path):
        found = detect_format(row) if isinstance(row, dict) else None
        if fmt is None and found is not None:
            _check_mode(found, mode, where)  # the file's format does not fit the mode: never skippable
            fmt = found
        try:
            _check_one(row, found, fmt, where)
            row = with_system(row, fmt, system)
            if fmt != "text":
                ex = encode_sft(row, fmt, tokenizer, where)
                if len(ex.input_ids) > max_len and truncate:
                    ex = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.prompt_ids, ex.answer)
                    truncated += 1
                elif len(ex.input_ids) > max_len and not skip_bad_rows:
                    too_long.append((where, len(ex.input_ids)))  # reported together after the loop
                    continue
                elif len(ex.input_ids) > max_len:
                    raise DataError(f"{where}: {len(ex.input_ids)} tokens, longer than max_len={max_len}")
                examples.append(ex)
            rows.append(row)
        except DataError as err:
            if not skip_bad_rows:
                raise
            reasons.append(str(err))

    if too_long:
        raise _too_long_error(too_long, max_len)
    require_rows(path, rows, reasons)
    if fmt == "text":
        examples = pack_text(rows, tokenizer, max_len)
        if not examples:
            raise DataError(f"{path}: the text holds fewer than 2 tokens; nothing to train on")
    return Dataset(examples, rows, fmt, len(reasons), path, reasons[:20], truncated)


def _check_one(row, found: str | None, fmt: str | None, where: str) -> None:
    """Raise the DataError of a row that is unreadable, of no known format, of another format than the file's."""
    if isinstance(row, DataError):
        raise row
    if found is None:
        raise DataError(
            f"{where}: no 'messages', 'prompt'/'completion' or 'text' field (fields: {sorted(row)}); "
            "expected one of these formats"
        )
    if found != fmt:
        raise DataError(f"{where}: a {found!r} row in a file of {fmt!r} rows; expected one format per file")
    check_row(row, fmt, where)


def _too_long_error(too_long: list[tuple[str, int]], max_len: int, shown: int = 5) -> DataError:
    """One error for every SFT row over max_len: the first one's FILE:LINE leads, then the count and a few more."""
    (where, n), others = too_long[0], too_long[1:shown]
    listed = "".join(f", {w} ({k})" for w, k in others) + (" ..." if len(too_long) > shown else "")
    return DataError(
        f"{where}: {n} tokens, longer than max_len={max_len}; {len(too_long)} rows are too long ({where} ({n})"
        f"{listed}); raise max_len, shorten them, or pass --truncate to cut them to max_len"
    )


def _check_mode(fmt: str, mode: str, where: str) -> None:
    if mode == "cpt" and fmt != "text":
        raise DataError(
            f"{where}: mode 'cpt' (continual pre-training) expects 'text' rows, got a {fmt!r} row; use mode 'sft' for chat or prompt/completion data"
        )
    if mode == "sft" and fmt == "text":
        raise DataError(
            f"{where}: mode 'sft' expects 'messages' or 'prompt'/'completion' rows, got a 'text' row; use mode 'cpt' for raw text"
        )


def pad_id_of(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pads = pad_id), attention_mask (1 on tokens), labels (-100 on pads).

    Returns:
        {"input_ids", "attention_mask", "labels"}: LongTensors of shape (batch, longest example).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
