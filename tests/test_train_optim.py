"""`--optimizer`, `--scheduler`, LoRA+ (`--lora-plus-ratio`): the groups, the lr of each, and exact resume."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from conftest import bnb_unusable, randomize_adapters
from lorakit.train import checkpoint, optim
from lorakit.train.loop import fit
from train_tiny import config, examples, model_with_adapter

OPTIMIZERS = ["adamw", "sgd", "adafactor"] + ([] if bnb_unusable() else ["adamw8bit"])


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_schedules():
    total, warmup = 10, 2
    for name, after in (
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        ("linear", lambda p: 1 - p),
        ("constant", lambda p: 1.0),
    ):
        got = [optim.lr_factor(s, total, warmup, name) for s in range(total)]
        assert got[:2] == [0.5, 1.0]
        assert got[2:] == pytest.approx([after((s - 2) / 8) for s in range(2, total)])
    assert optim.lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)


def test_lora_plus_ratio_reaches_the_param_groups_and_the_update():
    model = model_with_adapter()
    params = _trainable(model)
    cfg = config("unused", lr=1e-3, lora_plus_ratio=16.0)
    opt = optim.build(params, cfg)
    b_ids = {id(p) for n, p in params.items() if n.endswith(".B")}
    assert len(opt.param_groups) == 2 and len(b_ids) == len(opt.param_groups[1]["params"]) > 0
    assert {id(p) for p in opt.param_groups[1]["params"]} == b_ids
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]
    optim.set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 8e-3]
    assert len(optim.build(params, config("unused")).param_groups) == 1


def test_lora_plus_first_adam_step_moves_B_by_lr_times_ratio(tmp_path):
    # Step 1 of Adam moves each parameter with a non-zero gradient by lr · g/|g| (bias-corrected moments):
    # B (zero at init, non-zero gradient) by exactly its group's lr; A gets no gradient while B = 0.
    for ratio, expected in ((None, 1e-3), (16.0, 16e-3)):
        model = model_with_adapter()
        before = {n: p.detach().clone() for n, p in _trainable(model).items()}
        cfg = config(tmp_path / f"r{ratio}", steps=1, lr=1e-3, warmup=0.0, lora_plus_ratio=ratio)
        fit(model, examples(), cfg, pad_id=0)
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in _trainable(model).items()}
        b_moves = [v for n, v in moved.items() if n.endswith(".B")]
        assert b_moves and all(v == pytest.approx(expected, rel=1e-3) for v in b_moves)
        assert max(v for n, v in moved.items() if n.endswith(".A")) == 0.0


def test_lora_plus_without_B_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="no trainable LoRA B"):
        optim.param_groups({"x.weight": p}, 4.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(tmp_path, name, monkeypatch):
    steps, kw = 8, {"optimizer": name, "lora_plus_ratio": 4.0 if name == "adamw" else None, "lr": 5e-3}
    full = model_with_adapter()
    out = tmp_path / "resumed"
    save = checkpoint.save

    def save_and_keep_step_4(output, step, **kw):  # a finished run keeps only its final checkpoint
        path = save(output, step=step, **kw)
        if step == 4:
            shutil.copytree(path, out / "checkpoint" / path.name)
            (out / "checkpoint" / "LATEST").write_text(path.name)
        return path

    monkeypatch.setattr(checkpoint, "save", save_and_keep_step_4)
    fit(full, examples(), config(tmp_path / "full", steps=steps, save_every=4, **kw), pad_id=0)
    monkeypatch.setattr(checkpoint, "save", save)
    # Resume from the step-4 checkpoint, in another run directory, into a model with other adapter values.
    assert checkpoint.latest(out).name == "step-000004"
    resumed = model_with_adapter()
    randomize_adapters(resumed, seed=5)  # everything must come from the checkpoint
    fit(resumed, examples(), config(out, steps=steps, save_every=4, resume=True, **kw), pad_id=0)
    a, b = _trainable(full), _trainable(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)
    start = _trainable(model_with_adapter())
    assert max((a[n] - start[n]).abs().max().item() for n in a if n.endswith(".B")) > 1e-4  # it trained


def test_resume_with_another_optimizer_is_refused(tmp_path):
    fit(model_with_adapter(), examples(), config(tmp_path, steps=4, save_every=2), pad_id=0)
    with pytest.raises(ValueError, match="optimizer: checkpoint 'adamw', now 'sgd'"):
        fit(
            model_with_adapter(),
            examples(),
            config(tmp_path, steps=4, optimizer="sgd", resume=True),
            pad_id=0,
        )
