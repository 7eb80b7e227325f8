"""Preference modes in the training loop and on the command line: accumulation, resume, precomputed
reference, data errors, and what a run writes (tiny models, seconds each)."""

import importlib.util
import json
import os
import signal

import pytest
import torch

import lorakit
from conftest import quantizable_llama_dir, tiny_llama, tiny_tokenizer
from lorakit.data import DataError
from lorakit.data.preference import load_preference
from lorakit.train import TrainConfig, loop
from lorakit.train.metrics import read as metrics_read
from lorakit.train.preference import objective as objective_mod

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _pairs(n=8):
    return [
        {
            "prompt": f"what is {i} + {i}?",
            "chosen": str(2 * i),
            "rejected": f"{2 * i + 1} or so" * (1 + i % 2),
        }
        for i in range(n)
    ]


def _kto(n=8):
    return [
        {"prompt": f"say {i}", "completion": f"{i}" if i % 2 else f"not {i}", "label": bool(i % 2)}
        for i in range(n)
    ]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _model(dropout=0.0):
    model = tiny_llama()
    torch.manual_seed(1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, dropout=dropout))
    return model


def _fit(tmp_path, examples, name, **kw):
    base = dict(
        output=str(tmp_path / name), steps=4, lr=5e-2, warmup=0.0, batch_size=4, grad_accum=1, log_every=1
    )
    cfg = TrainConfig(**{**base, **kw})
    model = _model(cfg.dropout)
    if cfg.precompute_ref:
        objective_mod.precompute_reference(model, examples, cfg.batch_size, 0)
    loop.fit(model, examples, cfg, pad_id=0)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, atol=2e-6):  # fp32 rounding after 4 AdamW steps, as the SFT loop test
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["dpo", "orpo", "kto"])
def test_accumulation_equals_one_batch(mode, tmp_path):
    rows = _kto() if mode == "kto" else _pairs()
    ds = load_preference(_write(tmp_path / "d.jsonl", rows), tiny_tokenizer(), mode, 64)
    one = _fit(tmp_path, ds.examples, "one", mode=mode, batch_size=4, grad_accum=1)
    untrained = {n: p for n, p in _model().named_parameters() if p.requires_grad}
    assert max(float((one[k] - untrained[k]).abs().max()) for k in one) > 1e-3  # it trained
    if mode == "kto":
        # KTO's KL estimate pairs the rows of one micro-batch, so only the same micro-batches give the same update.
        return
    two = _fit(tmp_path, ds.examples, "two", mode=mode, batch_size=2, grad_accum=2)
    _assert_same(one, two)


def test_precomputed_reference_equals_live(tmp_path):
    ds = load_preference(_write(tmp_path / "d.jsonl", _pairs()), tiny_tokenizer(), "dpo", 64)
    live = _fit(tmp_path, ds.examples, "live", mode="dpo", loss_type="ipo", beta=0.5)
    ds2 = load_preference(_write(tmp_path / "d.jsonl", _pairs()), tiny_tokenizer(), "dpo", 64)
    pre = _fit(tmp_path, ds2.examples, "pre", mode="dpo", loss_type="ipo", beta=0.5, precompute_ref=True)
    assert all(ex.ref_chosen is not None for ex in ds2.examples)
    _assert_same(live, pre)


def test_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    """Ctrl-C mid-run checkpoints; --resume then ends with the adapter of an uninterrupted run (dropout on)."""
    ds = load_preference(_write(tmp_path / "d.jsonl", _pairs()), tiny_tokenizer(), "dpo", 64)
    opts = dict(mode="dpo", steps=4, batch_size=2, grad_accum=2, dropout=0.1)
    whole = _fit(tmp_path, ds.examples, "whole", **opts)

    calls = {"n": 0}
    plain = objective_mod.PreferenceObjective.micro_loss

    def interrupting(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 2: the loop finishes it, checkpoints and stops
            os.kill(os.getpid(), signal.SIGINT)
        return plain(self, *args, **kw)

    monkeypatch.setattr(objective_mod.PreferenceObjective, "micro_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, ds.examples, "cut", **opts)
    monkeypatch.setattr(objective_mod.PreferenceObjective, "micro_loss", plain)
    assert (tmp_path / "cut" / "checkpoint").is_dir()
    resumed = _fit(tmp_path, ds.examples, "cut", resume=True, **opts)
    _assert_same(whole, resumed)
    steps = [
        r["step"] for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())
    ]
    assert steps == [1, 2, 3, 4]


def test_bad_rows_name_file_and_line(tmp_path):
    tok = tiny_tokenizer()
    long = _pairs(3)
    long[1]["rejected"] = "x" * 100
    with pytest.raises(
        DataError, match=r"d\.jsonl:2: prompt \+ rejected is \d+ tokens, longer than max_len=64"
    ):
        load_preference(_write(tmp_path / "d.jsonl", long), tok, "dpo", 64)
    missing = _pairs(3)
    del missing[2]["chosen"]
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'chosen' is missing"):
        load_preference(_write(tmp_path / "d.jsonl", missing), tok, "dpo", 64)
    wrong_role = _pairs(2)
    wrong_role[0]["chosen"] = {"role": "user", "content": "hi"}
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'chosen' .*expected an assistant message"):
        load_preference(_write(tmp_path / "d.jsonl", wrong_role), tok, "dpo", 64)
    label = _kto(3)
    label[1]["label"] = "maybe"
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'label' is str 'maybe'; expected true or false"):
        load_preference(_write(tmp_path / "d.jsonl", label), tok, "kto", 64)
    ds = load_preference(_write(tmp_path / "d.jsonl", label), tok, "kto", 64, skip_bad_rows=True)
    assert len(ds.examples) == 2 and ds.skipped == 1


def test_loss_only_on_the_last_answer(tmp_path):
    """A messages prompt's earlier assistant turn is context: only the chosen answer carries labels."""
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "EARLIER"},
            {"role": "user", "content": "b"},
        ],
        "chosen": "yes",
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    tok = tiny_tokenizer()
    ex = load_preference(_write(tmp_path / "d.jsonl", [row]), tok, "dpo", 128).examples[0]
    labelled = tok.decode([t for t in ex.chosen.labels if t != -100])
    assert labelled == "yes<|im_end|>\n"
    assert tok.decode([t for t in ex.rejected.labels if t != -100]) == "no<|im_end|>\n"


@pytest.mark.parametrize("mode", ["dpo", "kto"])
def test_cli_run_writes_preference_metrics(mode, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.train.metrics import preference_series

    model_dir = quantizable_llama_dir(tmp_path / "model")
    rows = _kto() if mode == "kto" else _pairs()
    data = _write(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--mode", mode,
            "--output", str(out), "--steps", "3", "--batch-size", "4", "--lr", "0.05", "--rank", "4",
            "--eval-every", "3", "--max-len", "64", "--log-every", "1"]  # fmt: skip
    assert main(args + (["--report-to", "tensorboard"] if TENSORBOARD else [])) == 0
    err = capsys.readouterr().err
    # The eval line of the progress shows the preference metrics too; loss.png has their panels.
    assert ("eval loss" in err) and ("reward_accuracy" if mode == "dpo" else "kl ") in err.split("eval loss")[
        1
    ]
    titles = [t for t, _ in preference_series(metrics_read(out / "metrics.jsonl"))]
    assert len(titles) == (3 if mode == "dpo" else 2) and any("log-probs" in t for t in titles), titles
    if TENSORBOARD:  # --report-to: the per-step preference metrics and the final held-out ones
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        want = {"reward_margin", "final/after/reward_margin"} if mode == "dpo" else {"kl", "final/after/kl"}
        assert want <= tags, tags
    before = (out / "metrics.jsonl").read_text()
    assert main(args + ["--resume"]) == 0  # a finished run: nothing to do, nothing rewritten
    assert "already finished" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    results = json.loads((out / "results.json").read_text())
    reward = "reward_margin" if mode == "dpo" else "rewards_desirable"
    assert results["before"][reward] == 0.0  # B = 0: the policy is the reference, every implicit reward is 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    key = "reward_margin" if mode == "dpo" else "kl"
    assert all(key in r for r in records if "loss" in r) and any("eval_loss" in r for r in records)
    assert (out / "loss.png").stat().st_size > 0 and (out / "adapter_model.safetensors").is_file()
    shown = "acc " if mode == "dpo" else "kl "
    assert shown in err  # the progress line shows the preference metric
