"""Preference modes under torchrun (2 gloo processes on CPU) against one process with the same global batch:
the adapter, the logged loss and reward metrics, checkpoints and exact --resume; `lorakit train --mode dpo`
under FSDP (evaluation and the saved adapter). The same harness as tests/test_distributed.py."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import lorakit
from lorakit.train import checkpoint
from lorakit.train.loop import fit
from test_distributed import adapter, torchrun, train_cli_fsdp
from test_train_resume import assert_same
from train_tiny import config, model_with_adapter, preference_examples

STEPS = 4


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_process(tmp_path, mode, name="one", **kw):
    """The single-process reference: 8 rows a step as 4 micro-batches of 2 (2 processes x 2 x 2 accumulation)."""
    model = model_with_adapter()
    out = tmp_path / name
    fit(model, preference_examples(mode), config(out, steps=STEPS, batch_size=2, grad_accum=4, mode=mode, **kw),
        pad_id=0)  # fmt: skip
    lorakit.save_adapter(model, out / "adapter")
    return out


def _assert_same_records(two, one, keys):
    a, b = _records(two), _records(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)


@pytest.mark.parametrize(
    "mode,keys",
    [("dpo", ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")),
     ("kto", ("loss", "kl", "rewards_desirable", "logps_desirable", "logps_undesirable"))],
)  # fmt: skip
def test_ddp_equals_one_process(mode, keys, tmp_path):
    """KTO: z0 is the step's (all micro-batches, both processes): 2 processes x 2 accumulation = 1 x 4."""
    out = tmp_path / "ddp"
    res = torchrun(out, "--mode", mode, "--steps", STEPS, "--batch-size", 2, "--grad-accum", 2)
    assert "8 rows (2 x 2 accumulation x 2 processes)" in res.stderr
    one = _one_process(tmp_path, mode)
    assert_same(adapter(out), adapter(one), atol=1e-5)
    _assert_same_records(out, one, keys)
    assert max(t.abs().max() for k, t in adapter(one).items() if "lora_B" in k) > 1e-3  # it did train
    if mode == "kto":
        assert max(r["kl"] for r in _records(one)) > 0  # the reference point was active (not clamped to 0)


def test_fsdp_dpo_checkpoint_and_resume_are_exact(tmp_path):
    """FSDP, stopped (as Ctrl-C) after step 3 with a checkpoint every 2 steps, resumed: the adapter and the
    records of an uninterrupted run, which equal one process's."""
    args = ["--mode", "dpo", "--steps", STEPS, "--batch-size", 2, "--grad-accum", 2, "--distributed", "fsdp",
            "--save-every", 2]  # fmt: skip
    whole = tmp_path / "whole"
    torchrun(whole, *args)
    assert_same(adapter(whole), adapter(_one_process(tmp_path, "dpo")), atol=1e-5)
    cut = tmp_path / "cut"
    stopped = torchrun(cut, *args, "--stop-after", 3, check=False)
    assert stopped.returncode != 0 and "stopped after step 3/4" in stopped.stderr, stopped.stderr[-3000:]
    assert checkpoint.load(checkpoint.latest(cut)).step == 3
    torchrun(cut, *args, "--resume")
    assert_same(adapter(cut), adapter(whole), atol=1e-6)
    _assert_same_records(cut, whole, ("loss", "reward_accuracy", "reward_margin", "logps_chosen"))


def test_lorakit_train_dpo_under_fsdp_equals_one_process(tmp_path):
    """`torchrun -m lorakit train --mode dpo --distributed fsdp`: the held-out metrics before / after (the
    after ones on every rank, FSDP's forwards) and the saved adapter equal one process's."""
    from conftest import tiny_llama, tiny_tokenizer
    from lorakit.train import TrainConfig, run

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rows = [{"prompt": f"what is {i} + {i}?", "chosen": str(2 * i), "rejected": f"{2 * i + 1} or so"}
            for i in range(12)]  # fmt: skip
    for name, part in (("train", rows[:8]), ("eval", rows[8:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    opts = dict(model=str(base), data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "eval.jsonl"),
                mode="dpo", rank=4, steps=3, lr=2e-2, warmup=0.0, eval_every=2, grad_accum=1)  # fmt: skip
    out = tmp_path / "fsdp"
    train_cli_fsdp(out, opts)
    one = run(TrainConfig(output=str(tmp_path / "one"), batch_size=4, **opts))
    two = json.loads((out / "results.json").read_text())
    for when in ("before", "after"):
        for key in ("loss", "reward_accuracy", "reward_margin", "preference_accuracy", "exact_match"):
            assert two[when][key] == pytest.approx(one[when][key], rel=1e-5, abs=1e-6), (when, key)
    assert one["after"]["reward_margin"] > 0
    files = [load_file(str(p / "adapter_model.safetensors")) for p in (out, tmp_path / "one")]
    assert_same(*files, atol=1e-5)
