"""`lorakit eval` / `lorakit generate` of a run's adapter use the run's system prompt (issue 16).

A run whose training rows all share one system prompt saves it beside the adapter (system_prompt.txt); eval
gives it to the rows that have none, generate puts it before the user turn; `--system` overrides, '' drops it.
"""

from __future__ import annotations

import json

import pytest

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.data.formats import with_system

SYSTEM = "You convert dates to ISO 8601."


@pytest.fixture
def run_dir(tmp_path):
    """A base model dir and an adapter dir as `lorakit train` leaves it (adapter + system_prompt.txt)."""
    tok = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_llama(vocab=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    model = tiny_llama(vocab=len(tok))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, tmp_path / "run")
    (tmp_path / "run" / "system_prompt.txt").write_text(SYSTEM)
    return base, tmp_path / "run"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _eval(capsys, *args) -> dict:
    assert main(["eval", *args, "--json", "--max-new-tokens", "2"]) == 0
    return json.loads(capsys.readouterr().out)


def test_with_system_fills_only_rows_without_one():
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    first = with_system({"messages": convo}, "messages", "S")["messages"][0]
    assert first == {"role": "system", "content": "S"}
    own = {"messages": [{"role": "system", "content": "mine"}, *convo]}
    assert with_system(own, "messages", "S") is own
    assert with_system({"prompt": "q", "completion": "a"}, "prompt", "S")["system"] == "S"
    assert with_system({"prompt": "q", "completion": "a", "system": "x"}, "prompt", "S")["system"] == "x"
    assert with_system({"text": "t"}, "text", "S") == {"text": "t"}
    assert with_system({"prompt": "q", "completion": "a"}, "prompt", "") == {"prompt": "q", "completion": "a"}


def test_eval_uses_the_runs_system_prompt_for_rows_without_one(run_dir, tmp_path, capsys):
    base, run = run_dir
    rows = [{"prompt": f"March {i}, 2020", "completion": f"2020-03-{i:02d}"} for i in range(1, 7)]
    plain = _write(tmp_path / "plain.jsonl", rows)
    explicit = _write(tmp_path / "explicit.jsonl", [{**r, "system": SYSTEM} for r in rows])
    common = ["--model", str(base), "--adapter", str(run)]
    by_default = _eval(capsys, *common, "--data", plain)
    # The same loss as rows that carry the run's system prompt themselves ...
    assert by_default == _eval(capsys, *common, "--data", explicit)
    # ... and another one without it ('' drops it), so the prompt did reach the model.
    none = _eval(capsys, *common, "--data", plain, "--system", "")
    assert abs(none["loss"] - by_default["loss"]) > 1e-4
    other = _eval(capsys, *common, "--data", plain, "--system", "Answer in French.")
    assert abs(other["loss"] - by_default["loss"]) > 1e-4
    assert main(["eval", *common, "--data", plain, "--max-new-tokens", "2"]) == 0
    assert "its system prompt" in capsys.readouterr().err


def test_generate_uses_the_runs_system_prompt_and_system_overrides(run_dir, capsys):
    from lorakit.generation import generate_text
    from lorakit.models import load_model

    base, run = run_dir
    model, tok = load_model(str(base), adapter=str(run))
    # Greedy over a random model with a random adapter: the three prompts give three different texts.
    sample = dict(max_new_tokens=12)
    want = {s: generate_text(model, tok, "hi", system=s, **sample) for s in (SYSTEM, None, "Be terse.")}
    assert len(set(want.values())) == 3
    common = ["generate", "hi", "--model", str(base), "--adapter", str(run), "--max-new-tokens", "12"]
    for flags, system in (([], SYSTEM), (["--system", ""], None), (["--system", "Be terse."], "Be terse.")):
        assert main([*common, *flags]) == 0
        assert capsys.readouterr().out.rstrip("\n") == want[system]


def test_training_heldout_metrics_equal_eval_of_the_saved_adapter(tmp_path, capsys):
    """Training rows share a system prompt, held-out rows have none: the run's after-training loss is the
    one `lorakit eval --adapter RUN` reports (both give the held-out rows the run's system prompt)."""
    from lorakit.train import TrainConfig, run

    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": f"March {i}, 2020", "completion": f"2020-03-{i:02d}"} for i in range(1, 9)]
    train = _write(tmp_path / "t.jsonl", [{**r, "system": SYSTEM} for r in rows])
    held = _write(tmp_path / "e.jsonl", rows[:4])
    cfg = TrainConfig(model=str(tmp_path / "base"), data=train, eval_data=held, output=str(tmp_path / "out"),
                      rank=2, steps=2, batch_size=4, lr=1e-2)  # fmt: skip
    results = run(cfg)
    capsys.readouterr()
    got = _eval(capsys, "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "out"), "--data", held)
    assert got["loss"] == pytest.approx(results["after"]["loss"], rel=1e-5)
    without = _eval(capsys, "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "out"), "--data",
                    held, "--system", "")  # fmt: skip
    assert abs(without["loss"] - results["after"]["loss"]) > 1e-4  # the prompt made the difference
