"""lorakit.data: formats, exact loss masks, file:line errors, packing, CSV/Parquet, collate."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_tokenizer
from lorakit.data import DataError, Example, collate, demo_paths, load_dataset

CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_messages_labels_cover_exactly_the_assistant_turns(tmp_path):
    tok = tiny_tokenizer()  # one token per character: the expected mask can be built piece by piece
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), tok)
    prompt1 = (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    answer1 = "yo<|im_end|>\n"
    prompt2 = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    answer2 = "4<|im_end|>\n"
    want_ids, want_labels = [], []
    for text, loss in ((prompt1, False), (answer1, True), (prompt2, False), (answer2, True)):
        want_ids += ids(tok, text)
        want_labels += ids(tok, text) if loss else [-100] * len(ids(tok, text))
    ex = ds.examples[0]
    assert ds.format == "messages" and ds.skipped == 0 and ds.rows == [{"messages": CHAT}]
    assert ex.input_ids == want_ids
    assert ex.labels == want_labels
    assert ex.prompt_ids == ids(tok, prompt1 + answer1 + prompt2)
    assert ex.answer == "4"


def test_prompt_completion_with_a_chat_template_is_a_user_turn_and_an_answer(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"prompt": "hi", "completion": "yo", "system": "S"}]
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    ref = load_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}]), tok)
    assert ds.format == "prompt"
    assert ds.examples == ref.examples


def test_prompt_completion_without_a_chat_template_is_concatenation_plus_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 1+1=", "completion": " 2"}]), tok)
    ex = ds.examples[0]
    prompt = tok("Q: 1+1=")["input_ids"]
    assert ex.input_ids == prompt + ids(tok, " 2") + [tok.eos_token_id]
    assert ex.labels == [-100] * len(prompt) + ids(tok, " 2") + [tok.eos_token_id]
    assert ex.prompt_ids == prompt and ex.answer == " 2"


def test_messages_need_a_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match=r"d\.jsonl:1: 'messages' rows need a tokenizer with a chat template"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), tok)


def test_text_is_joined_with_eos_and_packed_into_blocks(tmp_path):
    tok = tiny_tokenizer()
    ds = load_dataset(
        write_jsonl(tmp_path / "t.jsonl", [{"text": "abcde"}, {"text": "fghijkl"}]),
        tok,
        mode="cpt",
        max_len=5,
    )
    eos = tok.eos_token_id
    stream = ids(tok, "abcde") + [eos] + ids(tok, "fghijkl") + [eos]  # 14 tokens: blocks of 5, 5, 4
    assert ds.format == "text" and len(ds.rows) == 2
    assert [ex.input_ids for ex in ds.examples] == [stream[0:5], stream[5:10], stream[10:14]]
    assert all(ex.labels == ex.input_ids for ex in ds.examples)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', r"invalid JSON .*expected one JSON object per line"),
        ("[1, 2]", r"expected a JSON object, got list"),
        (
            {"question": "x"},
            r"no 'messages', 'prompt'/'completion' or 'text' field \(fields: \['question'\]\)",
        ),
        ({"messages": "hi"}, r"field 'messages' is str 'hi'; expected a non-empty list"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"roles \['user'\] have no assistant turn; expected at least one assistant answer",
        ),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            r"messages\[0\]\.role is str 'bot'; expected one of",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            r"messages\[0\]\.content is int 3; expected a string",
        ),
        (
            {"messages": CHAT + [{"role": "user", "content": "bye"}]},
            r"the last message is 'user'; expected the conversation to end",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}]},
            r"expected a user turn before the first answer",
        ),
        ({"prompt": "x"}, r"field 'completion' is missing; expected a non-empty string"),
        ({"prompt": "x", "completion": 5}, r"field 'completion' is int 5; expected a non-empty string"),
        ({"text": "x"}, r"a 'text' row in a file of 'messages' rows; expected one format per file"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 300}]},
            r"\d+ tokens, longer than max_len=200",
        ),
    ],
)
def test_a_bad_row_names_file_and_line_or_is_skipped_and_counted(tmp_path, line, message):
    is_pair = isinstance(line, dict) and "prompt" in line
    good = {"prompt": "a", "completion": "b"} if is_pair else {"messages": CHAT}
    # Line 2 is blank (ignored): the bad row is line 3.
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line, good])
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=rf"^{tmp_path}/bad\.jsonl:3: (.*; )?{message}"):
        load_dataset(path, tok, max_len=200)
    ds = load_dataset(path, tok, max_len=200, skip_bad_rows=True)
    assert ds.skipped == 1 and len(ds.examples) == 2 and ds.rows == [good, good]
    assert ds.skipped_reasons[0].startswith(f"{tmp_path}/bad.jsonl:3: ")


def test_no_usable_rows_is_an_error_naming_the_file(tmp_path):
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{empty}: no usable rows"):
        load_dataset(empty, tok)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{", {"prompt": "x"}])
    with pytest.raises(
        DataError,
        match=r"bad\.jsonl: no usable rows \(2 bad rows skipped; first: .*bad\.jsonl:1: invalid JSON",
    ):
        load_dataset(bad, tok, skip_bad_rows=True)


def test_format_must_fit_the_mode_even_when_skipping(tmp_path):
    tok = tiny_tokenizer()
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(
        DataError, match=r"t\.jsonl:1: mode 'sft' expects 'messages' or 'prompt'/'completion' rows"
    ):
        load_dataset(text, tok, mode="sft", skip_bad_rows=True)
    with pytest.raises(DataError, match=r"c\.jsonl:1: mode 'cpt' .* expects 'text' rows"):
        load_dataset(chat, tok, mode="cpt")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(tmp_path / "nope.jsonl", tok)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: unknown data file type '\.txt'"):
        load_dataset(tmp_path / "d.txt", tok)


def test_csv_and_parquet_give_the_same_examples_as_jsonl(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    tok = tiny_tokenizer()
    chats = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    pairs = [{"prompt": "a,b\nc", "completion": 'say "x"'}, {"prompt": "q", "completion": "r"}]
    for rows in (chats, pairs):
        ref = load_dataset(write_jsonl(tmp_path / "r.jsonl", rows), tok)
        table = pd.DataFrame(
            [{k: json.dumps(v) if k == "messages" else v for k, v in r.items()} for r in rows]
        )
        table.to_csv(tmp_path / "r.csv", index=False)
        assert load_dataset(tmp_path / "r.csv", tok).examples == ref.examples
        pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
        assert load_dataset(tmp_path / "r.parquet", tok).examples == ref.examples
    (tmp_path / "r.json").write_text(json.dumps(pairs, indent=2))  # a JSON array file (Alpaca style)
    assert (
        load_dataset(tmp_path / "r.json", tok).examples
        == load_dataset(write_jsonl(tmp_path / "p.jsonl", pairs), tok).examples
    )
    (tmp_path / "bad.json").write_text(json.dumps(pairs + [{"prompt": "x"}]))
    with pytest.raises(DataError, match=r"bad\.json:row 3: field 'completion' is missing"):
        load_dataset(tmp_path / "bad.json", tok)
    # A CSV error names the line the record starts on (the header is line 1; the first record spans 2-3).
    pd.DataFrame(pairs + [{"prompt": "x", "completion": ""}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad\.csv:5: field 'completion' is str ''"):
        load_dataset(tmp_path / "bad.csv", tok)
    pd.DataFrame(pairs + [{"prompt": "x", "completion": None}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 3: field 'completion' is missing"):
        load_dataset(tmp_path / "bad.parquet", tok)


def test_collate_right_pads_with_masked_labels():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_demo_files_load_as_chat_rows():
    train, held_out = demo_paths()
    tok = tiny_tokenizer()
    tr, ev = load_dataset(train, tok), load_dataset(held_out, tok)
    assert tr.format == ev.format == "messages" and len(tr) >= 1000 and len(ev) >= 50
    seen = {r["messages"][1]["content"] for r in tr.rows}
    assert not seen & {r["messages"][1]["content"] for r in ev.rows}  # held-out inputs are new


@pytest.mark.slow
def test_real_chatml_template_masks_only_the_answers(tmp_path):
    from transformers import AutoTokenizer

    from lorakit.models import model_dir

    tok = AutoTokenizer.from_pretrained(str(model_dir("default")))  # SmolLM2's ChatML template, BPE tokens
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "Hello, friend!"
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}]), tok)
    ex = ds.examples[0]
    labelled = [i for i, lab in enumerate(ex.labels) if lab != -100]
    assert [ex.labels[i] for i in labelled] == [ex.input_ids[i] for i in labelled]
    assert tok.decode([ex.input_ids[i] for i in labelled]) == "Hello, friend!<|im_end|>\n4<|im_end|>\n"
    first = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert labelled[0] == len(ids(tok, first))  # the generation prompt is not trained on
    assert ex.prompt_ids == ex.input_ids[: len(ex.prompt_ids)] and ex.answer == "4"


def test_demo_defaults_are_a_valid_train_config():
    from lorakit.data import DEMO_DEFAULTS
    from lorakit.train.config import TrainConfig

    cfg = TrainConfig(**DEMO_DEFAULTS)
    assert cfg.data is None and cfg.steps == DEMO_DEFAULTS["steps"]
