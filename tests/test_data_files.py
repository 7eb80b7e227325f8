"""Training data and the files around it: FILE:LINE for every bad input (bad bytes, deep nesting, huge CSV
cells, empty answers), skippable where a row is at fault; pickle model weights: one line, never unpickled."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.data import DataError, load_dataset
from lorakit.train import TrainConfig

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
DEEP = "[" * 100_000 + "]" * 100_000


def _jsonl(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _good() -> bytes:
    return json.dumps(GOOD).encode()


BAD_JSONL_LINES = {
    "latin-1-byte": (
        json.dumps({"messages": [{"role": "user", "content": "caf"}, {"role": "assistant", "content": "x"}]})
        .encode()
        .replace(b"caf", b"caf\xe9"),
        r"not valid UTF-8 \(byte 0xe9 at column 47\); expected UTF-8 text",  # the byte's column
    ),
    "nested-100k-deep": (('{"messages": ' + DEEP + "}").encode(), r"JSON nested too deeply"),
    "nested-100k-deep-array": (DEEP.encode(), r"JSON nested too deeply"),
    "empty-assistant": (
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
        ).encode(),
        r"messages\[1\] is an empty assistant message; expected a non-empty answer",
    ),
    "blank-assistant-mid-conversation": (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": " \n"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ).encode(),
        r"messages\[1\] is an empty assistant message",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", BAD_JSONL_LINES)
def test_bad_jsonl_line_names_file_and_line_and_is_skippable(case, tmp_path):
    line, message = BAD_JSONL_LINES[case]
    path = _jsonl(tmp_path / "d.jsonl", [_good(), _good(), line, _good()])
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=rf"^{tmp_path}/d\.jsonl:3: {message}"):
        load_dataset(path, tok)
    ds = load_dataset(path, tok, skip_bad_rows=True)
    assert ds.skipped == 1 and len(ds.examples) == 3 and ds.rows == [GOOD] * 3
    assert ds.skipped_reasons[0].startswith(f"{tmp_path}/d.jsonl:3: ")


def test_utf8_bom_is_not_a_bad_first_row(tmp_path):
    path = _jsonl(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + _good(), _good()])
    assert len(load_dataset(path, tiny_tokenizer()).examples) == 2


def test_json_array_file_errors_name_the_file_and_line(tmp_path):
    tok = tiny_tokenizer()
    bad_byte = tmp_path / "a.json"
    bad_byte.write_bytes(b'[\n{"text": "a"},\n{"text": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=rf"^{bad_byte}:3: not valid UTF-8 \(byte 0xe9\)"):
        load_dataset(bad_byte, tok, mode="cpt")
    deep = tmp_path / "deep.json"
    deep.write_text("[" + DEEP + "]")
    with pytest.raises(DataError, match=rf"^{deep}: JSON nested too deeply"):
        load_dataset(deep, tok, mode="cpt")


def _csv(path: Path, rows: list[bytes]) -> str:
    path.write_bytes(b"prompt,completion\r\n" + b"".join(r + b"\r\n" for r in rows))
    return str(path)


def test_csv_cell_longer_than_the_csv_module_limit(tmp_path):
    tok = tiny_tokenizer()
    huge = b"y" * 200_000  # > csv's default field limit of 131072 characters
    path = _csv(tmp_path / "d.csv", [b"a,b", b"x," + huge, b"c,d"])
    # Read fine; refused only as a row longer than max_len, with its FILE:LINE (and skippable).
    with pytest.raises(DataError, match=rf"^{tmp_path}/d\.csv:3: \d+ tokens, longer than max_len=512"):
        load_dataset(path, tok)
    ds = load_dataset(path, tok, skip_bad_rows=True)
    assert ds.skipped == 1 and [r["prompt"] for r in ds.rows] == ["a", "c"]
    ds = load_dataset(path, tok, max_len=300_000)
    assert ds.rows[1]["completion"] == huge.decode()


def test_csv_limit_is_restored_after_reading(tmp_path):
    import csv

    before = csv.field_size_limit()
    load_dataset(_csv(tmp_path / "d.csv", [b"a,b"]), tiny_tokenizer())
    assert csv.field_size_limit() == before


def test_csv_bad_byte_names_its_line_and_is_skippable(tmp_path):
    tok = tiny_tokenizer()
    path = _csv(tmp_path / "d.csv", [b"a,b", b'"multi\r\nline",ok', b"caf\xe9,x", b"c,d"])
    with pytest.raises(
        DataError, match=rf"^{tmp_path}/d\.csv:5: column 'prompt' is not valid UTF-8 \(byte 0xe9\)"
    ):
        load_dataset(path, tok)
    ds = load_dataset(path, tok, skip_bad_rows=True)
    assert ds.skipped == 1 and [r["prompt"] for r in ds.rows] == ["a", "multi\r\nline", "c"]


def test_other_text_inputs_name_file_and_line(tmp_path):
    from lorakit.vocab import read_new_tokens

    tokens = tmp_path / "new.txt"
    tokens.write_bytes(b"<a>\n<b\xff>\n")
    with pytest.raises(ValueError, match=rf"^{tokens}:2: not valid UTF-8 \(byte 0xff\)"):
        read_new_tokens(tokens, tiny_tokenizer())
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_bytes(b"rank: 4\nmodel: caf\xe9\n")
    with pytest.raises(ValueError, match=rf"^{yaml_file}:2: not valid UTF-8"):
        TrainConfig.from_yaml(yaml_file)
    yaml_file.write_text("rank: " + "[" * 100_000)
    with pytest.raises(ValueError, match=rf"^{yaml_file}"):
        TrainConfig.from_yaml(yaml_file)


@pytest.fixture
def pickle_only_model(tmp_path):
    """A model directory whose weights are a pickle that would create a marker file when unpickled."""
    d = tmp_path / "model"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    os.remove(d / "model.safetensors")
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    return d, marker


@pytest.mark.parametrize("command", ["train", "generate", "merge"])
def test_pickle_only_model_dir_is_one_line_error_never_unpickled(
    command, pickle_only_model, tmp_path, capsys
):
    d, marker = pickle_only_model
    data = _jsonl(tmp_path / "d.jsonl", [_good()])
    argv = {
        "train": [
            "train",
            "--model",
            str(d),
            "--data",
            data,
            "--output",
            str(tmp_path / "out"),
            "--steps",
            "1",
        ],
        "generate": ["generate", "hi", "--model", str(d)],
        "merge": [
            "merge",
            "--model",
            str(d),
            "--adapter",
            str(tmp_path / "a"),
            "--output",
            str(tmp_path / "m"),
        ],
    }[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lorakit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "pytorch_model.bin" in lines[0] and "never loads" in lines[0]
    assert not marker.exists()


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    data = _jsonl(tmp_path / "d.jsonl", [_good(), b'{"messages": ' + DEEP.encode() + b"}"])
    argv = ["train", "--model", str(base), "--data", data, "--output", str(tmp_path / "o"), "--steps", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"lorakit: error: {data}:2: JSON nested too deeply" in err and "Traceback" not in err
