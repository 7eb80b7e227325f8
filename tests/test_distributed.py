"""`--distributed ddp|fsdp` over 2 processes (gloo, CPU) against one process with the same global batch;
FSDP's per-rank memory for the base; exact resume under FSDP; multi-node on loopback; FSDP + QLoRA refused.

Every run is `tests/train_tiny.py` (a tiny random Llama, r=4 adapters on all linear layers) under
`python -m torch.distributed.run`; the reference is `loop.fit` in this process.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train import checkpoint, loop
from lorakit.train.loop import fit
from test_train_resume import TESTS, assert_same, env
from train_tiny import config, examples, model_with_adapter, stop_after

STEPS = 6


def torchrun(out, *args, nproc=2, timeout=180, check=True, extra_launch=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", *(extra_launch or ["--standalone"]),
           "--nproc_per_node", str(nproc), str(TESTS / "train_tiny.py"), str(out), *map(str, args)]  # fmt: skip
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def train_cli_fsdp(out, opts: dict, timeout=240):
    """`torchrun --nproc_per_node 2 -m lorakit train --output OUT --batch-size 2 --distributed fsdp` with `opts`
    as flags; asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "lorakit", "train", "--output", str(out), "--batch-size", "2", "--distributed", "fsdp"]  # fmt: skip
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def one_process(tmp_path, name="one", dropout=0.0, **kw):
    """The single-process reference: 8 rows per step as 4 micro-batches of 2, saved as PEFT files."""
    model = model_with_adapter(dropout=dropout)
    out = tmp_path / name
    fit(
        model,
        examples(),
        config(out, steps=STEPS, batch_size=2, grad_accum=4, dropout=dropout, **kw),
        pad_id=0,
    )
    lorakit.save_adapter(model, out / "adapter")
    return adapter(out)


FSDP_ARGS = ["--steps", STEPS, "--batch-size", 2, "--grad-accum", 2, "--distributed", "fsdp",
             "--gradient-checkpointing", "--save-every", 2, "--report-memory"]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 processes x 2 rows x 2 accumulation under FSDP, gradient checkpointing on, memory measured."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, torchrun(out, *FSDP_ARGS)


def test_fsdp_equals_one_process_with_the_same_global_batch(fsdp_run, tmp_path):
    out, res = fsdp_run
    assert "8 rows (2 x 2 accumulation x 2 processes)" in res.stderr
    two, one = adapter(out), one_process(tmp_path)
    assert_same(two, one, atol=1e-5)
    assert max(t.abs().max() for k, t in one.items() if "lora_B" in k) > 1e-3  # it did train
    # The file is the one a single process writes: same keys, shapes, config.
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "one" / "adapter" / "adapter_config.json").read_text())
    assert cfg == ref


def test_fsdp_holds_about_half_the_base_per_rank(fsdp_run):
    out, _ = fsdp_run
    for rank in (0, 1):
        mem = json.loads((out / f"memory-rank{rank}.json").read_text())
        # At rest: every frozen tensor is a dim-0 shard (FSDP pads rows to a multiple of 2 processes).
        assert mem["rest"] <= 0.5 * mem["single"] * 1.02, mem
        assert mem["rest"] >= 0.45 * mem["single"], mem
        # Peak, inside a layer's forward: the shards, the root (embeddings, head, norm) and that layer gathered.
        assert mem["peak"] < 0.85 * mem["single"], mem
        assert mem["fast_lora_calls"] > 0  # the fast LoRA Function ran under FSDP (and checkpointing)


def test_ddp_equals_one_process_with_accumulation_and_checkpointing(tmp_path):
    out = tmp_path / "ddp"
    res = torchrun(out, "--steps", STEPS, "--batch-size", 2, "--grad-accum", 2, "--distributed", "ddp",
                   "--gradient-checkpointing", "--report-memory")  # fmt: skip
    assert "8 rows (2 x 2 accumulation x 2 processes)" in res.stderr
    assert_same(adapter(out), one_process(tmp_path), atol=1e-5)
    assert json.loads((out / "memory-rank1.json").read_text())["fast_lora_calls"] > 0  # the fast Function


def test_fsdp_resume_is_exact_and_resumes_on_another_process_count(fsdp_run, tmp_path):
    out = tmp_path / "resumed"
    stopped = torchrun(out, *FSDP_ARGS, "--stop-after", 3, check=False)
    assert stopped.returncode != 0 and "stopped after step 3/6" in stopped.stderr, stopped.stderr[-3000:]
    ckpt = checkpoint.load(checkpoint.latest(out))
    assert ckpt.step == 3 and len(ckpt.rng) == 2
    # The checkpoint holds full tensors (the names and shapes one process saves), not shards.
    single = model_with_adapter()
    assert {n: tuple(p.shape) for n, p in single.named_parameters() if p.requires_grad} == {
        n: tuple(t.shape) for n, t in ckpt.trainable.items()
    }
    other = tmp_path / "one-process"
    shutil.copytree(out / "checkpoint", other / "checkpoint")
    torchrun(out, *FSDP_ARGS, "--resume")
    assert_same(adapter(out), adapter(fsdp_run[0]), atol=1e-6)
    # The same checkpoint resumed by one process (no dropout: nothing random in a step) ends the same.
    model = model_with_adapter()
    cfg = config(other, steps=STEPS, batch_size=2, grad_accum=4, save_every=2, resume=True)
    fit(model, examples(), cfg, pad_id=0)
    lorakit.save_adapter(model, other / "adapter")
    assert_same(adapter(other), adapter(fsdp_run[0]), atol=1e-5)


def test_resume_on_another_process_count_with_dropout_is_refused(tmp_path):
    """Dropout masks come from per-process RNG streams: 1 process's checkpoint cannot resume as 2."""
    out = tmp_path / "switch"
    model = model_with_adapter(dropout=0.1)
    original = loop.set_lr
    stop_after(3)
    cfg = config(out, steps=STEPS, batch_size=2, grad_accum=4, dropout=0.1, save_every=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(model, examples(), cfg, pad_id=0)
    finally:
        loop.set_lr = original
    res = torchrun(out, "--steps", STEPS, "--batch-size", 2, "--grad-accum", 2, "--distributed", "fsdp",
                   "--dropout", 0.1, "--save-every", 2, "--resume", check=False)  # fmt: skip
    assert res.returncode != 0
    assert "saved by 1 process, this run has 2: with dropout (0.1)" in res.stderr, res.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_one_process(tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d`, launched twice on this machine."""
    out = tmp_path / "nodes"
    port = _free_port()
    launch = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
              "--rdzv-id", "lorakit-test"]  # fmt: skip
    args = ["--steps", STEPS, "--batch-size", 2, "--grad-accum", 2, "--distributed", "fsdp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", "1",
           str(TESTS / "train_tiny.py"), str(out), *map(str, args)]  # fmt: skip
    nodes = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    errs = [p.communicate(timeout=180)[1] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [e[-2000:] for e in errs]
    assert any("8 rows (2 x 2 accumulation x 2 processes)" in e for e in errs)
    assert_same(adapter(out), one_process(tmp_path), atol=1e-5)


def test_fsdp_qlora_shards_the_4bit_base_and_equals_ddp(tmp_path):
    """bitsandbytes on CPU: FSDP2 shards the packed 4-bit bytes; training equals DDP's (each rank whole)."""
    from conftest import bnb_unusable, quantizable_llama_dir

    if bnb_unusable():
        pytest.skip(bnb_unusable())
    base = quantizable_llama_dir(tmp_path / "base")
    args = ["--steps", 4, "--batch-size", 2, "--grad-accum", 1, "--quantized-model", base, "--report-memory"]
    torchrun(tmp_path / "ddp", *args, "--distributed", "ddp", "--no-packing")  # FSDP pads: the same layout
    torchrun(tmp_path / "fsdp", *args, "--distributed", "fsdp")
    ddp, fsdp = adapter(tmp_path / "ddp"), adapter(tmp_path / "fsdp")
    assert_same(fsdp, ddp, atol=1e-6)
    assert max(t.abs().max() for k, t in ddp.items() if "lora_B" in k) > 1e-4  # it did train
    for rank in (0, 1):
        whole = json.loads((tmp_path / "ddp" / f"memory-rank{rank}.json").read_text())
        shard = json.loads((tmp_path / "fsdp" / f"memory-rank{rank}.json").read_text())
        assert whole["rest"] == whole["single"]  # DDP: every rank holds the whole 4-bit base
        assert shard["rest"] <= 0.5 * shard["single"] * 1.02, shard


def test_fsdp_refuses_an_8bit_base_with_the_reason():
    from conftest import bnb_unusable

    if bnb_unusable():
        pytest.skip(bnb_unusable())
    import bitsandbytes as bnb

    from lorakit.train import distributed

    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to("cpu")  # quantizes
    model = torch.nn.Sequential(layer)
    assert type(layer.weight).__name__ == "Int8Params"
    with pytest.raises(ValueError, match="cannot shard an 8-bit bitsandbytes base.*Int8Params"):
        distributed.wrap(model, distributed.Context(), "fsdp")


def test_lorakit_train_under_fsdp_equals_one_process(tmp_path):
    """`torchrun -m lorakit train --distributed fsdp`: evaluation (loss, generation) on every rank, the
    chunked loss inside the FSDP root, the adapter gathered for rank 0's PEFT file."""
    from conftest import tiny_llama, tiny_tokenizer
    from lorakit.train import TrainConfig, run
    from test_train_run import write_rows

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    train, held_out = write_rows(tmp_path / "train.jsonl", 24, 0), write_rows(tmp_path / "eval.jsonl", 4, 1)
    opts = dict(model=str(base), data=str(train), eval_data=str(held_out), rank=4, steps=4, lr=2e-2,
                eval_every=2, loss_chunk=16, grad_accum=1)  # fmt: skip
    out = tmp_path / "fsdp"
    train_cli_fsdp(out, opts)
    one = run(TrainConfig(output=str(tmp_path / "one"), batch_size=4, **opts))
    two = json.loads((out / "results.json").read_text())
    for when in ("before", "after"):  # evaluated in batches of 2 (FSDP) and 4 (one process)
        for key in ("loss", "perplexity", "exact_match"):
            assert two[when][key] == pytest.approx(one[when][key], rel=1e-5), (when, key)
    fsdp_file = load_file(str(out / "adapter_model.safetensors"))
    assert_same(fsdp_file, load_file(str(tmp_path / "one" / "adapter_model.safetensors")), atol=1e-5)
