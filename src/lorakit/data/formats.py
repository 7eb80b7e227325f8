"""The three row formats and how each becomes token ids and labels (-100 where no loss is taken).

- "messages": {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}, rendered with the
  tokenizer's chat template; the loss covers every assistant turn (its content and the end-of-turn tokens the
  template puts after it) and nothing else. The turns are located by rendering the conversation prefix by prefix
  (with the generation prompt before each assistant turn), so any template that renders a prefix of the
  conversation as a prefix of the text works, and token boundaries are mapped through character offsets.
- "prompt": {"prompt": str, "completion": str, "system": str (optional)}. With a chat template it is exactly a
  conversation [system], user = prompt, assistant = completion. Without one it is plain concatenation:
  tokens(prompt, with the tokenizer's usual special tokens such as BOS) + tokens(completion) + EOS, the loss on
  the completion and EOS.
- "text": {"text": str}, continual pre-training: documents are joined with EOS and cut into blocks of max_len
  tokens, loss on every token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rows import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "prompt", "text")


@dataclass
class Example:
    """One training sequence. `labels` is -100 where no loss is taken.

    For SFT rows, `prompt_ids` are the tokens a model is given to produce the last answer and `answer` is that
    answer's reference text (both None for packed text blocks); evaluation's exact match uses them.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None
    answer: str | None = None


def detect_format(row: dict) -> str | None:
    """The format a row's keys announce, or None."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt"
    if "text" in row:
        return "text"
    return None


def check_row(row: dict, fmt: str, where: str) -> None:
    """Raise DataError "WHERE: what is wrong; expected ..." unless `row` is a well-formed `fmt` row."""
    if fmt == "text":
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{where}: field 'text' is {shown(row.get('text'))}; expected a non-empty string")
        return
    if fmt == "prompt":
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(
                    f"{where}: field {key!r} is {shown(row.get(key))}; expected a non-empty string"
                )
        if row.get("system") is not None and not isinstance(row["system"], str):
            raise DataError(f"{where}: field 'system' is {shown(row['system'])}; expected a string")
        return
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: field 'messages' is {shown(messages)}; expected a non-empty list of messages"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: messages[{i}] is {shown(m)}; expected an object with 'role' and 'content'"
            )
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {shown(m.get('role'))}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content is {shown(m.get('content'))}; expected a string")
        if m["role"] == "assistant" and not m["content"].strip():
            # As an empty completion: it would train the model to answer with nothing.
            raise DataError(
                f"{where}: messages[{i}] is an empty assistant message; expected a non-empty answer"
            )
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(
            f"{where}: roles {roles} have no assistant turn; expected at least one assistant answer"
        )
    if roles[-1] != "assistant":
        raise DataError(
            f"{where}: the last message is {roles[-1]!r}; expected the conversation to end with an assistant answer"
        )
    first = next(r for r in roles if r != "system")
    if first != "user":
        raise DataError(
            f"{where}: roles {roles} start with {first!r}; expected a user turn before the first answer"
        )


def as_messages(row: dict, fmt: str) -> list[dict]:
    """A prompt/completion row as the equivalent conversation (messages rows unchanged)."""
    if fmt == "messages":
        return row["messages"]
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]


def with_system(row: dict, fmt: str, system: str | None) -> dict:
    """`row` with `system` as its system prompt when it has none (a "messages" or "prompt" row; others as
    they are). A row's own system prompt wins; `system` None or "" changes nothing."""
    if not system or fmt not in ("messages", "prompt"):
        return row
    if fmt == "prompt":
        return row if row.get("system") else {**row, "system": system}
    messages = row["messages"]
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return row
    return {**row, "messages": [{"role": "system", "content": system}, *messages]}


def encode_sft(row: dict, fmt: str, tokenizer, where: str, last_only: bool = False) -> Example:
    """Token ids and labels for a checked "messages" or "prompt" row (no length limit applied here).

    last_only: the loss covers the last assistant turn only (preference training: earlier answers are context).

    Raises:
        DataError: a messages row for a tokenizer without a chat template, or a template that does not render
            prefixes of the conversation as prefixes of the text (its assistant turns cannot be located).
    """
    if getattr(tokenizer, "chat_template", None):
        return _encode_chat(as_messages(row, fmt), tokenizer, where, last_only)
    if fmt == "messages":
        raise DataError(
            f"{where}: 'messages' rows need a tokenizer with a chat template and this one has none; "
            "use 'prompt'/'completion' rows or a chat model"
        )
    prompt = tokenizer(row["prompt"])["input_ids"]
    answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    answer += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return Example(prompt + answer, [-100] * len(prompt) + answer, list(prompt), row["completion"])


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """The chat template's text for `messages` (a generation prompt appended when asked)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode_chat(messages: list[dict], tokenizer, where: str, last_only: bool = False) -> Example:
    text = render(tokenizer, messages, False)
    spans = []  # character spans [start, end) of each assistant turn inside `text`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True)
        if not text.startswith(before):  # a template without a generation prompt: the header gets loss too
            before = render(tokenizer, messages[:i], False)
        upto = render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(upto) and len(before) < len(upto)):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render the conversation up to message {i} as "
                "a prefix of the whole conversation, so the assistant turns cannot be located"
            )
        spans.append((len(before), len(upto)))
    spans = spans[-1:] if last_only else spans
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    for j, (s, e) in enumerate(offsets):
        # Overlap, not containment: a token straddling the turn's start still carries part of the answer.
        if e > s and any(s < b and e > a for a, b in spans):
            labels[j] = ids[j]
    prompt_text = text[: spans[-1][0]]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return Example(ids, labels, prompt_ids, messages[-1]["content"])


def pack_text(rows: list[dict], tokenizer, max_len: int) -> list[Example]:
    """Join the documents with EOS and cut the token stream into blocks of `max_len` (the last may be shorter;
    a last block of one token is dropped, having nothing to predict)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for row in rows:
        stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
    blocks = [stream[i : i + max_len] for i in range(0, len(stream), max_len)]
    return [Example(b, list(b)) for b in blocks if len(b) > 1]


def shown(value) -> str:
    if value is None:
        return "missing"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
