"""`lorakit.train.run` / `lorakit train` end to end: what a run writes, and that the saved adapter is the
trained one (loading it reproduces the held-out loss measured right after training)."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lorakit
from conftest import tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.data import load_dataset
from lorakit.models import load_model
from lorakit.train import TrainConfig, metrics, run
from lorakit.train.evaluate import evaluate

RESULT_KEYS = {
    "before", "after", "trainable_params", "total_params", "steps", "train_seconds", "tokens_per_second", "config",
    "packing",
}  # fmt: skip


def write_rows(path, n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_run_writes_the_adapter_and_its_records(tmp_path, base_dir):
    train, held_out = write_rows(tmp_path / "train.jsonl", 24, 0), write_rows(tmp_path / "eval.jsonl", 6, 1)
    out = tmp_path / "out"
    cfg = TrainConfig(
        model=str(base_dir), data=str(train), eval_data=str(held_out), output=str(out), rank=4, steps=6,
        batch_size=4, lr=2e-2, eval_every=3, log_every=2,
    )  # fmt: skip
    results = run(cfg)

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "results.json",
            "metrics.jsonl", "loss.png"} <= names  # fmt: skip
    assert "checkpoint" not in names  # a finished run keeps only what the adapter needs
    assert set(results) == RESULT_KEYS
    assert json.loads((out / "results.json").read_text()) == results
    assert results["steps"] == 6 and 0 < results["trainable_params"] < results["total_params"]
    assert results["tokens_per_second"] > 0 and results["config"] == cfg.to_dict()
    assert TrainConfig.from_yaml(out / "train_config.yaml") == cfg
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = metrics.read(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]

    # The saved adapter is the trained one: loaded on a fresh base it gives the "after" loss exactly.
    model, tokenizer = load_model(str(base_dir))
    data = load_dataset(held_out, tokenizer)
    assert evaluate(model, tokenizer, data)["loss"] == pytest.approx(results["before"]["loss"], abs=1e-5)
    lorakit.load_adapter(model, out)
    after = evaluate(model, tokenizer, data)
    assert after["loss"] == pytest.approx(results["after"]["loss"], abs=1e-5)
    assert after["loss"] < results["before"]["loss"] - 0.05  # and it learned something
    final_eval = [r for r in records if "eval_loss" in r][-1]["eval_loss"]
    assert final_eval == pytest.approx(after["loss"], abs=1e-4)


def test_cli_train_and_nan_stop(tmp_path, base_dir, capsys, monkeypatch):
    train = write_rows(tmp_path / "train.jsonl", 12, 0)
    out = tmp_path / "cli"
    args = ["train", "--model", str(base_dir), "--data", str(train), "--output", str(out), "--rank", "2",
            "--steps", "2", "--batch-size", "4", "--targets", "q_proj,v_proj"]  # fmt: skip
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 2
    assert json.loads((out / "results.json").read_text())["before"] is None  # no eval data, not the demo

    # A diverging loss: a clear error, exit code 1, nothing half-written.
    from lorakit.train import loop

    monkeypatch.setattr(
        loop, "causal_lm_loss", lambda *a, **k: (torch.tensor(float("inf"), requires_grad=True), 1)
    )
    bad = tmp_path / "bad"
    assert main([*args[:6], str(bad), *args[7:]]) == 1
    err = capsys.readouterr().err
    assert "lorakit: error: step 1: the loss is inf" in err and "No checkpoint was saved" in err
    assert not (bad / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_default_model_on_a_few_demo_rows(tmp_path, capsys):
    """The real default model: two steps on four demo rows lower the held-out loss."""
    from lorakit.data import demo_paths

    train_all, eval_all = demo_paths()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(train_all.read_text().splitlines(keepends=True)[:4]))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(eval_all.read_text().splitlines(keepends=True)[:2]))
    out = tmp_path / "out"
    argv = ["train", "--data", str(train), "--eval-data", str(held_out), "--output", str(out), "--steps", "2",
            "--batch-size", "2", "--lr", "2e-3", "--warmup", "0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["loss"] < results["before"]["loss"]
    assert "held-out (2 rows)" in capsys.readouterr().out
