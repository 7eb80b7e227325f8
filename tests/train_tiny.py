"""Train a tiny Llama on synthetic rows with `lorakit.train.loop.fit`: the subprocess of the train tests.

    python tests/train_tiny.py OUT --steps 12 [--save-every 2] [--resume] [--sleep 0.05] [--dropout 0.1]
Run under `python -m torch.distributed.run --nproc_per_node 2` it trains data-parallel. The final adapter is
saved to OUT/adapter (PEFT format) by rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lorakit  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from lorakit.train import TrainConfig, distributed, loop  # noqa: E402


def examples(n: int = 24, seed: int = 0) -> list:
    """Rows of 6..20 tokens; the first 3 tokens carry no loss, so rows have different loss-token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(6, 21, (1,), generator=g))
        ids = torch.randint(3, 128, (k,), generator=g).tolist()
        out.append(SimpleNamespace(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    return out


def model_with_adapter(seed: int = 0, dropout: float = 0.0):
    model = tiny_llama(seed=seed)
    torch.manual_seed(seed + 1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, dropout=dropout))
    return model


def config(output, **kw) -> TrainConfig:
    base = dict(output=str(output), steps=12, lr=1e-2, warmup=0.2, batch_size=2, grad_accum=2, log_every=1)
    return TrainConfig(**{**base, **kw})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per micro-batch, to be killed mid-run")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None, help="e.g. cuda (default: the process's device, CPU here)")
    a = p.parse_args()
    torch.set_num_threads(1)
    ctx = distributed.init()
    cfg = config(
        a.output, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, save_every=a.save_every,
        dropout=a.dropout, resume=a.resume,
    )  # fmt: skip
    model = model_with_adapter(dropout=a.dropout).to(a.device or ctx.device)
    if a.sleep:
        plain = loop.causal_lm_loss

        def slow(*args, **kw):
            time.sleep(a.sleep)
            return plain(*args, **kw)

        loop.causal_lm_loss = slow
    try:
        loop.fit(model, examples(), cfg, pad_id=0, ctx=ctx)
    except KeyboardInterrupt:
        return 130
    if ctx.is_main:
        lorakit.save_adapter(model, os.path.join(a.output, "adapter"))
    distributed.barrier(ctx)
    distributed.close(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
