"""The training loop against plain references: schedule, data order, accumulation, clipping, NaN stop."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit.data import collate
from lorakit.train import checkpoint, loop
from lorakit.train.loop import NonFiniteLoss, fit
from lorakit.train.optim import lr_factor
from lorakit.train.order import step_rows
from train_tiny import config, examples, model_with_adapter


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_lr_schedule_values():
    # warmup 2 of 10 steps: 1/2, 1, then cosine over the 8 remaining steps.
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(9, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(0, 5, 0) == 1.0
    factors = [lr_factor(s, 100, 10) for s in range(100)]
    assert all(0 < f <= 1 for f in factors)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # non-increasing after warmup


def test_step_rows_cover_each_epoch_once_and_cross_epochs():
    rows = [r for s in range(6) for r in step_rows(s, 10, 4, seed=3)]  # 24 rows = 2.4 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    assert rows[:10] != rows[10:20]  # a new permutation each epoch
    assert step_rows(2, 10, 4, seed=3) == rows[8:12]  # a pure function of the step: resume needs no state
    assert step_rows(0, 10, 4, seed=4) != step_rows(0, 10, 4, seed=3)


def reference_train(model, rows_data, cfg):
    """A plain loop: each step's rows as one batch, HF's own mean token loss, clip, AdamW, the schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    G = cfg.batch_size * cfg.grad_accum
    warmup = round(cfg.warmup * cfg.steps)
    model.train()
    for step in range(cfg.steps):
        batch = collate([rows_data[i] for i in step_rows(step, len(rows_data), G, cfg.seed)], 0)
        loss = model(**batch).loss  # transformers: mean over the (shifted) label tokens of the whole batch
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.steps, warmup)
        opt.step()
        opt.zero_grad()
    return adapter_state(model)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_accumulation_equals_one_big_batch_and_reference(tmp_path, clip):
    data = examples(16)
    ref = reference_train(
        model_with_adapter(),
        data,
        config(tmp_path / "r", steps=5, batch_size=4, grad_accum=1, max_grad_norm=clip),
    )
    for bs, accum in [(4, 1), (2, 2), (1, 4)]:
        model = model_with_adapter()
        cfg = config(tmp_path / f"{bs}x{accum}", steps=5, batch_size=bs, grad_accum=accum, max_grad_norm=clip)
        fit(model, data, cfg, pad_id=0)
        assert_same(adapter_state(model), ref, atol=2e-6)


def test_clipping_is_applied(tmp_path):
    data = examples(16)
    runs = {}
    for clip in (0.0, 0.05):
        model = model_with_adapter()
        fit(model, data, config(tmp_path / str(clip), steps=4, max_grad_norm=clip), pad_id=0)
        runs[clip] = adapter_state(model)
    norms = [r["grad_norm"] for r in lorakit.train.metrics.read(tmp_path / "0.05" / "metrics.jsonl")]
    assert min(norms) > 0.05  # so the clip was active at every step ...
    diff = max((runs[0.0][k] - runs[0.05][k]).abs().max().item() for k in runs[0.0])
    assert diff > 1e-4  # ... and changed the result


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    plain, calls = loop.causal_lm_loss, []

    def poisoned(*args, **kw):
        s, n = plain(*args, **kw)
        calls.append(1)
        return (s * float("nan") if len(calls) > 5 * 2 else s), n  # step 6 (2 micro-batches per step)

    monkeypatch.setattr(loop, "causal_lm_loss", poisoned)
    model = model_with_adapter()
    cfg = config(tmp_path, steps=10, save_every=2, packing=False)  # padded: 2 micro-batches a step
    with pytest.raises(NonFiniteLoss, match=r"step 6: the loss is nan.*checkpoint.*step-000004.*4 steps"):
        fit(model, examples(), cfg, pad_id=0)
    ckpt = checkpoint.load(checkpoint.latest(tmp_path))
    assert ckpt.step == 4
    assert all(torch.isfinite(t).all() for t in ckpt.trainable.values())
    # Step 5's update is in the model, step 6's never reached it.
    assert all(torch.isfinite(p).all() for p in adapter_state(model).values())
    steps = [r["step"] for r in lorakit.train.metrics.read(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_unfinished_checkpoint_needs_resume(tmp_path):
    model = model_with_adapter()
    fit(model, examples(), config(tmp_path, steps=4, save_every=2), pad_id=0)  # leaves step-000002
    with pytest.raises(ValueError, match="unfinished run.*--resume"):
        fit(model_with_adapter(), examples(), config(tmp_path, steps=4), pad_id=0)
    with pytest.raises(ValueError, match=r"made with 4 rows per step, this run has 8"):
        fit(model_with_adapter(), examples(), config(tmp_path, steps=4, batch_size=4, resume=True), pad_id=0)
    with pytest.raises(ValueError, match=r"other options \(rank"):
        fit(model_with_adapter(), examples(), config(tmp_path, steps=4, rank=8, resume=True), pad_id=0)


def test_no_trainable_parameters_is_an_error(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, examples(), config(tmp_path), pad_id=0)


@pytest.mark.parametrize("option", ["loss_chunk", "gradient_checkpointing"])
def test_memory_options_train_the_same_adapter(tmp_path, option):
    data = examples(16)
    plain = model_with_adapter()
    fit(plain, data, config(tmp_path / "plain", steps=3), pad_id=0)
    model = model_with_adapter()
    if option == "gradient_checkpointing":
        from lorakit.train.prepare import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
        cfg = config(tmp_path / option, steps=3, gradient_checkpointing=True)
    else:
        cfg = config(tmp_path / option, steps=3, loss_chunk=8)
    fit(model, data, cfg, pad_id=0)
    assert_same(adapter_state(model), adapter_state(plain), atol=1e-5)
