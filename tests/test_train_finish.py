"""`--resume` on a finished run: it says so and changes nothing, including after a kill during the run's
last steps (after the adapter was saved, after results.json was written)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lorakit.train import TrainConfig, checkpoint, loop, run, scaffold
from test_train_run import write_rows


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _cfg(tmp_path, base_dir, **kw):
    train = write_rows(tmp_path / "train.jsonl", 16, 0)
    base = dict(model=str(base_dir), data=str(train), output=str(tmp_path / "out"), rank=2, steps=4,
                batch_size=4, lr=1e-2, save_every=2, log_every=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _files(out):
    """name -> (bytes, inode, mtime): any rewrite changes the inode (atomic saves replace files)."""
    return {
        p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.iterdir())
        if p.is_file()
    }


def _adapter(out):
    from lorakit.io import read_adapter

    return read_adapter(out)


def _assert_same(a, b):
    # Tensors and config, not bytes: safetensors writes the metadata keys in no fixed order.
    assert a.config == b.config and a.metadata == b.metadata and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _run(cfg):
    stream = io.StringIO()
    return loop.run(cfg, stream=stream), stream.getvalue()


def test_resume_of_a_finished_run_changes_nothing(tmp_path, base_dir):
    cfg = _cfg(tmp_path, base_dir)
    results = run(cfg)
    out = tmp_path / "out"
    before = _files(out)
    again, said = _run(_cfg(tmp_path, base_dir, resume=True))
    assert "already finished (4 steps" in said and "nothing to do" in said
    assert again == results
    assert _files(out) == before
    # Asking for more steps of a finished run is refused (it cannot be extended), still changing nothing.
    with pytest.raises(ValueError, match="finished run of another length.*steps: finished run 4, now 8"):
        run(_cfg(tmp_path, base_dir, resume=True, steps=8))
    assert _files(out) == before


def test_kill_after_results_before_cleanup_counts_as_finished(tmp_path, base_dir, monkeypatch):
    def killed(output):
        raise KeyboardInterrupt  # stands for a kill landing right after results.json was written

    monkeypatch.setattr(checkpoint, "remove", killed)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path, base_dir))
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "checkpoint").is_dir() and (out / "results.json").is_file()
    adapter = _adapter(out)
    _, said = _run(_cfg(tmp_path, base_dir, resume=True))
    assert "already finished" in said
    assert not (out / "checkpoint").exists()  # the interrupted cleanup is completed
    _assert_same(_adapter(out), adapter)


def test_kill_after_the_adapter_save_resumes_without_retraining(tmp_path, base_dir, monkeypatch):
    def killed(path, data):
        raise KeyboardInterrupt  # a kill after the adapter was saved, before results.json

    monkeypatch.setattr(scaffold, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path, base_dir))
    monkeypatch.undo()
    out = tmp_path / "out"
    adapter = _adapter(out)
    assert checkpoint.load(checkpoint.latest(out)).step == 4  # the trained state was checkpointed
    steps_logged = (out / "metrics.jsonl").read_text().count('"loss"')

    def no_training(*a, **k):
        raise AssertionError("retrained a step")

    monkeypatch.setattr(loop, "causal_lm_loss", no_training)
    results, said = _run(_cfg(tmp_path, base_dir, resume=True))
    assert "(step 4/4)" in said
    assert results["steps"] == 4 and (out / "results.json").is_file() and not (out / "checkpoint").exists()
    _assert_same(_adapter(out), adapter)
    assert (out / "metrics.jsonl").read_text().count('"loss"') == steps_logged


def test_a_new_run_over_a_finished_one_is_resumed_not_called_finished(tmp_path, base_dir, monkeypatch):
    run(_cfg(tmp_path, base_dir))
    out = tmp_path / "out"
    real = loop.causal_lm_loss
    calls = {"n": 0}

    def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # one micro-batch per step: steps 1-2 run, step 3 fails
            return torch.tensor(float("nan"), requires_grad=True), 1
        return real(*a, **k)

    monkeypatch.setattr(loop, "causal_lm_loss", dies_at_step_3)
    with pytest.raises(loop.NonFiniteLoss):
        run(_cfg(tmp_path, base_dir, lr=2e-2))  # another run (other lr) on the same output
    monkeypatch.undo()
    assert not (out / "results.json").exists()  # the old run's record no longer describes the output
    results, said = _run(_cfg(tmp_path, base_dir, lr=2e-2, resume=True))
    assert "resuming from" in said and "(step 2/4)" in said
    assert json.loads((out / "results.json").read_text())["config"]["lr"] == 2e-2
    assert os.path.isfile(out / "adapter_model.safetensors") and results["steps"] == 4
