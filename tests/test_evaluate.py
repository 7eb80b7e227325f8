"""lorakit.train.evaluate: loss against a plain reference, greedy exact match, batched left-padded generation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer
from lorakit.data import DEMO_DEFAULTS, collate, demo_paths, load_dataset
from lorakit.train import evaluate as ev_mod
from lorakit.train.evaluate import evaluate, generate_answers

PAIRS = [
    {"prompt": "red?", "completion": "apple"},
    {"prompt": "yellow, long?", "completion": "banana"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reference_loss(model, dataset) -> tuple[float, int]:
    """Mean token loss, one unpadded example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in dataset.examples:
            logits = model(torch.tensor([ex.input_ids])).logits[0]
            labels = torch.tensor(ex.labels[1:])
            total += F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count, count


@pytest.fixture(scope="module")
def trained():
    """A tiny model overfitted to answer PAIRS exactly (a case whose right answers we control)."""
    tok = tiny_tokenizer()
    model = tiny_llama(seed=3)
    import pathlib
    import tempfile

    ds = load_dataset(write_jsonl(pathlib.Path(tempfile.mkdtemp()) / "t.jsonl", PAIRS), tok)
    batch = collate(ds.examples, tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 1e-3:
            break
    return model.eval(), tok


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_loss_is_the_mean_over_loss_tokens_like_a_plain_reference(tmp_path, make):
    tok, model = tiny_tokenizer(), make(seed=1)
    rows = PAIRS + [{"prompt": "a much longer question here?", "completion": "and a longer answer"}]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    want, count = reference_loss(model, ds)
    got = evaluate(model, tok, ds, batch_size=2, max_new_tokens=4)  # padded batches
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["n"] == 3 and got["tokens"] == count
    assert 0.0 <= got["exact_match"] <= 1.0


def test_text_data_has_loss_and_no_exact_match(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama(seed=1)
    ds = load_dataset(
        write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 5}]), tok, mode="cpt", max_len=16
    )
    got = evaluate(model, tok, ds, batch_size=2)
    assert got["loss"] == pytest.approx(reference_loss(model, ds)[0], rel=1e-5)
    assert got["exact_match"] is None and got["n"] == len(ds.examples) == 4


def test_exact_match_counts_right_answers(trained, tmp_path):
    model, tok = trained
    assert generate_answers(model, tok, ["red?", "yellow, long?"], max_new_tokens=12) == ["apple", "banana"]
    wrong = {"prompt": "red?", "completion": "cherry"}
    ds = load_dataset(write_jsonl(tmp_path / "e.jsonl", PAIRS + [wrong]), tok)
    model.train()
    got = evaluate(model, tok, ds, batch_size=2)
    assert got["exact_match"] == pytest.approx(2 / 3)
    assert got["samples"][0] == {"reference": "apple", "generated": "apple"}
    assert model.training  # the mode it had is restored


def test_exact_match_ignores_surrounding_whitespace_only(monkeypatch, tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    ds = load_dataset(write_jsonl(tmp_path / "e.jsonl", PAIRS), tok)
    monkeypatch.setattr(ev_mod, "generate_answers", lambda *a, **k: ["  apple\n", "Banana"])
    assert evaluate(model, tok, ds)["exact_match"] == 0.5


def test_batched_left_padded_generation_equals_one_at_a_time():
    tok, model = tiny_tokenizer(), tiny_llama(seed=5)
    prompts = ["a", "a longer prompt", "mid size"]
    batched = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all(batched)
    as_ids = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    as_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in as_ids]
    assert generate_answers(model, tok, as_ids, max_new_tokens=6) == batched
    assert generate_answers(model, tok, [[{"role": "user", "content": p}] for p in prompts], 6) == batched


@pytest.mark.slow
def test_demo_is_not_solved_by_the_base_model():
    torch.set_num_threads(2)
    from lorakit.models import load_model

    model, tok = load_model("default")
    ds = load_dataset(demo_paths()[1], tok, max_len=DEMO_DEFAULTS["max_len"])  # every row fits
    ds.examples = ds.examples[:8]
    got = evaluate(model, tok, ds, batch_size=8, max_new_tokens=16)
    assert got["exact_match"] <= 0.125, got["samples"]
