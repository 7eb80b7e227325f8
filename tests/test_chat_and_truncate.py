"""Chat templates (`--chat-template`, `generate --system`) and SFT rows longer than max_len (issue 16)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.data import DataError, load_dataset
from lorakit.data.templates import TEMPLATES, set_chat_template, template_text
from lorakit.generation import format_prompt

CONVO = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_shipped_templates_render_prefixes_as_prefixes(name):
    tok = tiny_tokenizer()
    set_chat_template(tok, name)
    full = tok.apply_chat_template(CONVO, tokenize=False)
    for k in range(1, len(CONVO)):
        assert full.startswith(tok.apply_chat_template(CONVO[:k], tokenize=False))
    prompt = tok.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and "Be terse." in full and "2+2?" in full


def test_known_template_texts():
    tok = tiny_tokenizer()
    set_chat_template(tok, "llama-3")
    text = tok.apply_chat_template(CONVO[1:3], tokenize=False)
    assert text == "<s><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"  # fmt: skip
    set_chat_template(tok, "chatml")
    assert tok.apply_chat_template(CONVO[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_from_a_file_and_unknown_names(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert template_text(str(f)) == f.read_text()
    with pytest.raises(FileNotFoundError, match=r"'nope'.*one of \['chatml', 'gemma', 'llama-3', 'zephyr'\]"):
        template_text("nope")
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        template_text(tmp_path / "empty.jinja")


def test_chat_template_trains_saves_and_eval_generate_use_it(tmp_path, capsys):
    from lorakit.train import TrainConfig, run

    tok = tiny_tokenizer()
    tok.chat_template = None  # a base without a template: messages rows need --chat-template
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = TrainConfig(model=str(tmp_path / "base"), data=str(data), output=str(out), rank=2, steps=1,
                      batch_size=4, chat_template="zephyr")  # fmt: skip
    run(cfg)
    assert (out / "chat_template.jinja").read_text() == TEMPLATES["zephyr"]
    assert (out / "system_prompt.txt").read_text() == "S"  # every row shares it: generate's default
    base = ["--model", str(tmp_path / "base"), "--adapter", str(out)]
    assert main(["eval", *base, "--data", str(data), "--max-new-tokens", "2"]) == 0
    assert "its chat template" in capsys.readouterr().err
    # generate renders <|system|> S, then the user turn, with the run's template.
    from lorakit.models import load_model

    _, tok2 = load_model(str(tmp_path / "base"))
    set_chat_template(tok2, "zephyr")
    ids = format_prompt(tok2, "hi", system="S")
    assert tok2.decode(ids).startswith("<|system|>\nS") and tok2.decode(ids).endswith("<|assistant|>\n")
    assert main(["generate", "hi", *base, "--max-new-tokens", "1"]) == 0
    with pytest.raises(ValueError, match="system prompt needs a chat template"):
        format_prompt(tok2, "hi", chat=False, system="S")


def _long_rows(path, lengths):
    path.write_text("".join(json.dumps({"prompt": "p" * n, "completion": "abc"}) + "\n" for n in lengths))
    return path


def test_every_too_long_row_is_reported(tmp_path):
    path = _long_rows(tmp_path / "d.jsonl", [5, 50, 5, 60, 70, 80, 90, 100, 5])
    with pytest.raises(DataError) as err:
        load_dataset(path, tiny_tokenizer(), max_len=40)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and "6 rows are too long" in msg
    for line in (2, 4, 5, 6, 7):
        assert f"{path}:{line} (" in msg
    assert f"{path}:8 (" not in msg and msg.count("...") == 1 and "--truncate" in msg


def test_truncate_cuts_and_counts(tmp_path):
    tok = tiny_tokenizer()
    path = _long_rows(tmp_path / "d.jsonl", [5, 50, 30])
    ds = load_dataset(path, tok, max_len=40, truncate=True)
    full = load_dataset(path, tok, max_len=200)
    assert ds.truncated == 2 and len(ds.examples) == 3
    for cut, whole in zip(ds.examples, full.examples):
        n = min(40, len(whole.input_ids))
        assert cut.input_ids == whole.input_ids[:n] and cut.labels == whole.labels[:n]
    assert load_dataset(path, tok, max_len=200, truncate=True).truncated == 0
