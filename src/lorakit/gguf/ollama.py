"""export_ollama: the merged GGUF plus a `Modelfile` whose TEMPLATE, stop tokens and SYSTEM prompt reproduce the
tokenizer's Hugging Face chat template, so `ollama create NAME -f Modelfile` chats as lorakit's model does.

Ollama renders prompts with a Go template, not Jinja, so the HF template is translated, not copied. The
translation is by family: the HF template is rendered on probe conversations, matched against a known layout
(ChatML: SmolLM2, Qwen2; Llama-3), its default system prompt read off, and the Go template is accepted only if
a rendering of it equals the HF rendering on every probe. A template of no known family is an error that says
so; nothing is guessed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import atomic

# `$last` is true on the final message; the generation prompt follows a final non-assistant message, as the
# HF templates' add_generation_prompt does. System messages are rendered once, from .System (Ollama sets it to
# the request's system message, else the Modelfile's SYSTEM), so the range skips them.
_RANGE_HEAD = '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}{{- if ne .Role "system" }}'
_LAST = '{{ if and $last (ne .Role "assistant") }}'


@dataclass(frozen=True)
class Family:
    """A chat layout: `system_open + S + system_close`, then per message `open(role) + content + close`,
    then `generation` after a final non-assistant message."""

    name: str
    system_open: str
    system_close: str
    role_open: str  # with {role}
    close: str
    generation: str
    stops: tuple[str, ...]

    def render(self, system: str | None, messages: list[dict[str, str]]) -> str:
        """What the Go template renders for `messages` (no system messages) with `.System` = `system`."""
        out = f"{self.system_open}{system}{self.system_close}" if system else ""
        for i, m in enumerate(messages):
            out += self.role_open.format(role=m["role"]) + m["content"] + self.close
            if i == len(messages) - 1 and m["role"] != "assistant":
                out += self.generation
        return out

    def go_template(self, prefix: str = "") -> str:
        role_open = self.role_open.replace("{role}", "{{ .Role }}")
        return (
            f"{prefix}{{{{- if .System }}}}{self.system_open}{{{{ .System }}}}{self.system_close}{{{{ end }}}}"
            f"{_RANGE_HEAD}{role_open}{{{{ .Content }}}}{self.close}{_LAST}{self.generation}{{{{ end }}}}"
            "{{- end }}{{- end }}"
        )


FAMILIES = (
    Family(
        "ChatML",
        "<|im_start|>system\n",
        "<|im_end|>\n",
        "<|im_start|>{role}\n",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        ("<|im_end|>",),
    ),
    Family(
        "Llama-3",
        "<|start_header_id|>system<|end_header_id|>\n\n",
        "<|eot_id|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
)

PROBES = (
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
)


@dataclass
class OllamaTemplate:
    family: str
    template: str  # the Go template
    system: str | None  # the HF template's default system prompt, for SYSTEM
    stops: list[str]


def translate(tokenizer: Any) -> OllamaTemplate:
    """The Ollama TEMPLATE / SYSTEM / stops equivalent to `tokenizer.chat_template`.

    Raises:
        ValueError: no chat template, or one that is not a known family (naming the families and the first
            probe conversation whose rendering differs).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat_template: Ollama needs a TEMPLATE; add one to the tokenizer"
        )
    hf = [_hf_render(tokenizer, conv) for conv in PROBES]
    candidates = [(hf, "")]
    bos = tokenizer.bos_token or ""
    if bos and all(h.startswith(bos) for h in hf):
        # A template that writes BOS itself (Llama-3): llama.cpp adds BOS when the tokenizer does
        # (tokenizer.ggml.add_bos_token), so the Go template omits it then, and keeps it literal otherwise.
        probe = tokenizer("a")["input_ids"]
        prefix = "" if probe and probe[0] == tokenizer.bos_token_id else bos
        candidates.append(([h[len(bos) :] for h in hf], prefix))
    reasons = []
    for fam in FAMILIES:
        for rendered, prefix in candidates:
            system = _default_system(fam, rendered[0])
            mismatch = _first_mismatch(fam, system, rendered)
            if mismatch is None:
                eos = [tokenizer.eos_token] if tokenizer.eos_token else []
                stops = list(dict.fromkeys([*fam.stops, *eos]))
                return OllamaTemplate(fam.name, fam.go_template(prefix), system, stops)
        reasons.append(f"{fam.name}: {mismatch}")
    raise ValueError(
        "cannot translate this chat template to an Ollama TEMPLATE: it is none of the known families "
        f"({', '.join(f.name for f in FAMILIES)}). "
        + "; ".join(reasons)
        + ". Write TEMPLATE in the Modelfile by hand"
    )


def _hf_render(tokenizer: Any, conv: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def _default_system(fam: Family, user_only: str) -> str | None:
    """The system prompt the HF template inserts when the conversation has none (None if it inserts none)."""
    pattern = re.escape(fam.system_open) + "(.*?)" + re.escape(fam.system_close)
    found = re.match(pattern, user_only, flags=re.S)
    return found.group(1) if found else None


def _first_mismatch(fam: Family, default: str | None, hf: list[str]) -> str | None:
    for conv, expected in zip(PROBES, hf):
        system = next((m["content"] for m in conv if m["role"] == "system"), default)
        got = fam.render(system, [m for m in conv if m["role"] != "system"])
        if got != expected:
            return f"HF renders {expected[:80]!r}, the {fam.name} layout {got[:80]!r}"
    return None


def modelfile(gguf_name: str, tpl: OllamaTemplate, source: str) -> str:
    """The Modelfile text.

    Raises:
        ValueError: the template or system prompt contains `\"\"\"`, which a Modelfile string cannot hold.
    """
    for what, text in (("template", tpl.template), ("system prompt", tpl.system or "")):
        if '"""' in text:
            raise ValueError(f'the {what} contains """, which an Ollama Modelfile cannot quote')
    lines = [
        f"# {source}; chat template translated from the HF {tpl.family} template by lorakit export",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{tpl.template}"""',
    ]
    if tpl.system:
        lines.append(f'SYSTEM """{tpl.system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in tpl.stops]
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def export_ollama(
    model: str | os.PathLike = "default",
    adapter: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    quant: str = "f16",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `<output>/model-<quant>.gguf` (the merged model) and `<output>/Modelfile`.

    The template is translated before the (slow) GGUF is written, so an untranslatable template fails fast.

    Args:
        output: a directory (default `<adapter>/ollama`, or `ollama` without an adapter).
        (others as `export_gguf`).

    Returns:
        {output (the directory), gguf, modelfile, family, system, stops}.

    Raises:
        ValueError: as `translate`, `export_gguf`, or an existing Modelfile without `overwrite`.
    """
    from ..merge import unload
    from ..models import load_model
    from .writer import check_quant, write_gguf

    check_quant(quant)
    out = Path(output) if output is not None else (Path(adapter) / "ollama" if adapter else Path("ollama"))
    gguf_path, mf_path = out / f"model-{quant}.gguf", out / "Modelfile"
    if not overwrite and (gguf_path.exists() or mf_path.exists()):
        raise ValueError(
            f"{out} already holds an Ollama export; choose another --output (or pass --overwrite)"
        )
    base, tokenizer = load_model(model, dtype=torch.float32, adapter=adapter)
    tpl = translate(tokenizer)
    merged = unload(base, merge=True) if adapter is not None else base
    write_gguf(merged, tokenizer, gguf_path, quant)
    source = f"{model}" + (f" + adapter {adapter}" if adapter else "")
    atomic.write_text(mf_path, modelfile(gguf_path.name, tpl, source))
    return {
        "output": out,
        "gguf": gguf_path,
        "modelfile": mf_path,
        "family": tpl.family,
        "system": tpl.system,
        "stops": tpl.stops,
    }
