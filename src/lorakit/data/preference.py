"""Preference data: paired rows (DPO, ORPO) and unpaired labelled rows (KTO), tokenized exactly as SFT rows.

Row formats (JSONL / CSV / Parquet, read by `read_rows`, every error naming FILE:LINE):
- pairs: {"prompt": str | "messages": [conversation so far] (a list "prompt" reads as "messages"), "chosen": ANSWER, "rejected": ANSWER,
  "system": str (optional, with "prompt")}. ANSWER is a string, an assistant message {"role": "assistant",
  "content": str}, or a list holding one such message (TRL's conversational format).
- kto: {"prompt" | "messages", "completion": ANSWER, "label": true | false} (true: a desirable answer).

Each (prompt, answer) becomes the SFT conversation `prompt + [assistant answer]` and is encoded by
`formats.encode_sft` (the chat template applied as in SFT; without a template, prompt + answer + EOS), with the
loss on the final answer only (its text and the end-of-turn tokens the template adds). Earlier assistant
turns of a `messages` prompt are context. A sequence longer than `max_len` is an error, never truncated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .dataset import Dataset
from .formats import Example, check_row, encode_sft, shown
from .rows import DataError, read_rows, require_rows

PAIR_MODES = ("dpo", "orpo")
MODES = PAIR_MODES + ("kto",)


@dataclass
class PairExample:
    """A prompt with a chosen and a rejected answer: two SFT Examples (loss on the answer only).

    ref_chosen / ref_rejected: the reference model's summed answer log-probs, when precomputed (else None).
    """

    chosen: Example
    rejected: Example
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.chosen.prompt_ids

    @property
    def answer(self) -> str:
        return self.chosen.answer

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class KTOExample:
    """A prompt and one answer labelled desirable (True) or undesirable (False).

    ref: the reference's summed answer log-prob, when precomputed (the KL term's reference is always live).
    """

    example: Example
    label: bool
    ref: float | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.example.prompt_ids

    @property
    def answer(self) -> str:
        return self.example.answer

    @property
    def n_tokens(self) -> int:
        return len(self.example.input_ids)


def load_preference(
    path: str | os.PathLike, tokenizer, mode: str = "dpo", max_len: int = 512, skip_bad_rows: bool = False
) -> Dataset:
    """Read and tokenize a preference file: pairs for mode "dpo" / "orpo", labelled rows for "kto".

    Returns:
        a Dataset whose `examples` are PairExample (format "pairs") or KTOExample (format "kto").
    Raises:
        FileNotFoundError: no such file.
        DataError: "FILE:LINE: what is wrong; expected ...": a missing or malformed field, a sequence longer
            than `max_len`, or a file with no usable rows.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {MODES}")
    path = str(path)
    rows, examples, reasons = [], [], []
    for where, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            if mode == "kto":
                label = row.get("label")
                if isinstance(label, str) and label.lower() in ("true", "false"):  # CSV cells are strings
                    label = label.lower() == "true"
                if not isinstance(label, bool):
                    raise DataError(f"{where}: field 'label' is {shown(label)}; expected true or false")
                ex = _encode(row, "completion", tokenizer, max_len, where)
                examples.append(KTOExample(ex, label))
            else:
                chosen = _encode(row, "chosen", tokenizer, max_len, where)
                rejected = _encode(row, "rejected", tokenizer, max_len, where)
                examples.append(PairExample(chosen, rejected))
            rows.append(row)
        except DataError as err:
            if not skip_bad_rows:
                raise
            reasons.append(str(err))
    require_rows(path, rows, reasons)
    return Dataset(examples, rows, "kto" if mode == "kto" else "pairs", len(reasons), path, reasons[:20])


def _answer(value, key: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise DataError(
                f"{where}: field {key!r} is {shown(value)}; expected an assistant message "
                "{'role': 'assistant', 'content': str}"
            )
        value = value["content"]
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where}: field {key!r} is {shown(value)}; expected a non-empty string or an assistant message"
        )
    return value


def _encode(row: dict, key: str, tokenizer, max_len: int, where: str) -> Example:
    """The SFT Example of (the row's prompt, its answer under `key`), length-checked."""
    answer = _answer(row.get(key), key, where)
    if "messages" in row or isinstance(row.get("prompt"), list):  # a list "prompt": TRL's conversational rows
        messages = row["messages"] if "messages" in row else row["prompt"]
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"{where}: field 'messages' is {shown(messages)}; expected the conversation so far"
            )
        sft = {"messages": messages + [{"role": "assistant", "content": answer}]}
        fmt = "messages"
    elif isinstance(row.get("prompt"), str):
        sft = {"prompt": row["prompt"], "completion": answer, "system": row.get("system")}
        fmt = "prompt"
    else:
        raise DataError(
            f"{where}: field 'prompt' is {shown(row.get('prompt'))} and there is no 'messages'; expected a prompt "
            "string or the conversation so far"
        )
    check_row(sft, fmt, where)
    ex = encode_sft(sft, fmt, tokenizer, where, last_only=True)
    if len(ex.input_ids) > max_len:
        raise DataError(
            f"{where}: prompt + {key} is {len(ex.input_ids)} tokens, longer than max_len={max_len}; raise "
            "max_len or shorten the row (rows are never truncated)"
        )
    return ex


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones (one forward).

    Returns:
        {"input_ids", "attention_mask", "labels"} (2B, longest) and, when every example has them,
        "ref_chosen" / "ref_rejected" (B,) float32.
    """
    from .dataset import collate

    batch = collate([ex.chosen for ex in examples] + [ex.rejected for ex in examples], pad_id)
    if examples and all(ex.ref_chosen is not None for ex in examples):
        batch["ref_chosen"] = torch.tensor([ex.ref_chosen for ex in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([ex.ref_rejected for ex in examples], dtype=torch.float32)
    return batch


def collate_kto(examples: list[KTOExample], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of B rows, plus the B mismatched rows of KTO's KL estimate.

    The mismatched row i is prompt i followed by the answer of row i - 1 (row 0 takes the last row's answer),
    spliced at token level where the answer's loss starts: TRL's rotation of completions within a batch.

    Returns:
        {"input_ids", "attention_mask", "labels", "label" (B,) bool, "kl_input_ids", "kl_attention_mask",
         "kl_labels"} and "ref" (B,) float32 when every example has it.
    """
    from .dataset import collate

    seqs = [ex.example for ex in examples]
    batch = collate(seqs, pad_id)
    batch["label"] = torch.tensor([ex.label for ex in examples], dtype=torch.bool)
    mismatched = []
    for i, ex in enumerate(seqs):
        other = seqs[i - 1]
        p, q = _answer_start(ex), _answer_start(other)
        mismatched.append(
            Example(ex.input_ids[:p] + other.input_ids[q:], [-100] * p + other.labels[q:], ex.input_ids[:p])
        )
    kl = collate(mismatched, pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    if examples and all(ex.ref is not None for ex in examples):
        batch["ref"] = torch.tensor([ex.ref for ex in examples], dtype=torch.float32)
    return batch


def _answer_start(ex: Example) -> int:
    return next(i for i, t in enumerate(ex.labels) if t != -100)
