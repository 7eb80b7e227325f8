"""Exact resume: a run killed with SIGKILL (or stopped with Ctrl-C) and resumed ends with the same adapter as
an uninterrupted run; and data-parallel training over 2 processes equals one process with the same batch."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import randomize_adapters
from lorakit.train import checkpoint, metrics
from lorakit.train.loop import fit
from train_tiny import config, examples, model_with_adapter

TESTS = Path(__file__).parent
SRC = str(TESTS.parent / "src")
STEPS = 12


def env():
    return {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


@contextlib.contextmanager
def one_thread():
    """What train_tiny.py runs under (torch.set_num_threads(1)): CPU kernels' rounding may depend on the thread
    setting (the flash-attention backward sums per-thread partials), so in-process runs compared bit for bit
    with a subprocess's steps use the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def uninterrupted(tmp_path, dropout=0.1, **kw):
    model = model_with_adapter(dropout=dropout)
    with one_thread():
        fit(model, examples(), config(tmp_path / "full", steps=STEPS, dropout=dropout, **kw), pad_id=0)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def resume_in_process(out, dropout=0.1):
    model = model_with_adapter(dropout=dropout)
    randomize_adapters(model, seed=5)  # other adapter values: everything must come from the checkpoint
    torch.manual_seed(123)  # and so must the RNG (dropout)
    with one_thread():
        fit(model, examples(), config(out, steps=STEPS, dropout=dropout, save_every=2, resume=True), pad_id=0)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def start(out, *extra):
    cmd = [sys.executable, str(TESTS / "train_tiny.py"), str(out), "--steps", str(STEPS), "--save-every", "2",
           "--dropout", "0.1", "--sleep", "0.15", *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_resume_after_sigkill_gives_the_same_adapter(tmp_path):
    out = tmp_path / "killed"
    proc = start(out)
    wait_for(lambda: (p := checkpoint.latest(out)) is not None and p.name >= "step-000004", proc)
    time.sleep(0.4)  # mid-step, past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.load(checkpoint.latest(out)).step
    assert 4 <= killed_at < STEPS
    logged = [r["step"] for r in metrics.read(out / "metrics.jsonl")]
    resumed = resume_in_process(out)
    assert_same(resumed, uninterrupted(tmp_path))
    # metrics.jsonl: the steps after the checkpoint that the killed run logged were dropped and rerun once.
    steps = [r["step"] for r in metrics.read(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1)), (logged, steps)


def test_ctrl_c_leaves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "interrupted"
    proc = start(out)
    wait_for(lambda: len(metrics.read(out / "metrics.jsonl")) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    ckpt = checkpoint.load(checkpoint.latest(out))
    assert "stopped after step" in err and "--resume" in err
    assert 3 <= ckpt.step < STEPS
    assert ckpt.step == metrics.read(out / "metrics.jsonl")[-1]["step"]  # the step it stopped after
    assert_same(resume_in_process(out), uninterrupted(tmp_path))


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "train_tiny.py"), str(out), "--steps", "6", "--batch-size", "2", "--grad-accum", "1"]  # fmt: skip
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 rows (2 x 1 accumulation x 2 processes)" in res.stderr
    two = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # One process, same global batch of 4 rows as 2 micro-batches of 2.
    model = model_with_adapter()
    fit(model, examples(), config(tmp_path / "one", steps=6, batch_size=2, grad_accum=2), pad_id=0)
    import lorakit

    lorakit.save_adapter(model, tmp_path / "one" / "adapter")
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert_same(two, one, atol=1e-5)
    assert max(t.abs().max() for k, t in one.items() if "lora_B" in k) > 1e-3  # it did train
