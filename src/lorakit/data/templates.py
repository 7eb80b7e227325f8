"""Chat templates: `--chat-template FILE|NAME` for a tokenizer without one, or to replace its own.

Each shipped template renders a conversation prefix by prefix as a prefix of the whole (lorakit.data.formats
locates assistant turns that way) and supports `add_generation_prompt`. A run's template is saved beside its
adapter as `chat_template.jinja`; `lorakit eval` / `generate` of that adapter use it.
"""

from __future__ import annotations

import os
from pathlib import Path

SAVED_NAME = "chat_template.jinja"

TEMPLATES: dict[str, str] = {
    # OpenAI's ChatML (Qwen, SmolLM2, many others).
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    # Meta Llama 3 / 3.1 (without tool calls).
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # HuggingFace H4's Zephyr.
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + "
        "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # Google Gemma ("assistant" is called "model"; a system turn is prepended to the first user turn's text).
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else 'user' %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


def template_text(spec: str | os.PathLike) -> str:
    """The Jinja text of `spec`: a shipped template's name, or a file holding a template.

    Raises:
        FileNotFoundError: `spec` is neither a shipped name nor an existing file (the message lists the names).
        ValueError: the file is empty.
    """
    spec = str(spec)
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--chat-template {spec!r}: no such file and not a shipped template; expected a Jinja file or one "
            f"of {sorted(TEMPLATES)}"
        )
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"--chat-template {path}: the file is empty; expected a Jinja chat template")
    return text


def set_chat_template(tokenizer, spec: str | os.PathLike | None) -> str | None:
    """Replace `tokenizer.chat_template` with `spec`'s template (None: keep the tokenizer's). Returns the text
    now in use (None when the tokenizer has none)."""
    if spec is not None:
        tokenizer.chat_template = template_text(spec)
    return getattr(tokenizer, "chat_template", None)


def saved_template(adapter_dir: str | os.PathLike | None) -> str | None:
    """The chat template a training run saved beside its adapter (`chat_template.jinja`), if any."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / SAVED_NAME
    return str(path) if path.is_file() else None
