"""The training loop of `lorakit train`, meant to be read top to bottom.

    run(cfg)   prepare the model and data, evaluate, fit, evaluate again, write the adapter and the records
    fit(...)   the optimizer loop: AdamW, warmup + cosine, gradient accumulation, clipping, checkpoints

The data order is a pure function of (seed, step): each epoch is a seeded permutation of the rows, and step s
takes rows [s·G, (s+1)·G) of the concatenated epochs, G = batch_size · grad_accum · processes. So a resumed or
multi-process run sees exactly the rows a single uninterrupted run sees, and the checkpoint only needs the step.

The loss of an optimizer step is the sum of token losses over all its rows divided by the number of loss
tokens in all its rows (counted up front from the labels), so accumulating micro-batches, or splitting them
over processes, gives the same gradient as one big batch.
"""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..atomic import write_text
from ..data import collate
from ..losses import causal_lm_loss
from . import checkpoint, distributed
from .config import TrainConfig
from .metrics import MetricsLog, Progress, plot_loss


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stopped before applying the step."""


def run(cfg: TrainConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Train as `cfg` says; write the adapter and the run's records into `cfg.output`.

    `cfg.data=None` trains on the embedded demo dataset (and evaluates on its held-out split). Writes, on
    rank 0: the adapter (PEFT format; + the tokenizer when the vocabulary grew), `train_config.yaml`,
    `results.json`, `metrics.jsonl` and `loss.png`.

    Returns:
        results.json's dict: {"before", "after" (evaluate() metrics or None), "trainable_params",
        "total_params", "steps", "train_seconds", "tokens_per_second", "config"}.
    Raises:
        ValueError / FileNotFoundError: bad options, model or data (naming them).
        NonFiniteLoss: the loss diverged (the last checkpoint is kept).
        KeyboardInterrupt: Ctrl-C or SIGTERM, after saving a checkpoint to resume from.
    """
    ctx = distributed.init(cfg.distributed)
    try:
        return _run(cfg, ctx, stream or sys.stderr)
    finally:
        distributed.close(ctx)


def _run(cfg: TrainConfig, ctx: distributed.Context, stream: TextIO) -> dict[str, Any]:
    from lorakit import adapters
    from lorakit.data import demo_paths, load_dataset
    from lorakit.models import is_quantized

    from .evaluate import evaluate
    from .prepare import prepare, save_prepared

    say = functools.partial(_say, stream) if ctx.is_main else (lambda *a: None)
    output = Path(cfg.output)
    _seed(cfg.seed)

    # 1. The model with a fresh adapter, and the data tokenized by its tokenizer.
    prepared = prepare(cfg)
    model, tokenizer = prepared.model, prepared.tokenizer
    if not is_quantized(model):
        model.to(ctx.device)
    train_path, eval_path = cfg.data, cfg.eval_data
    if train_path is None:
        train_path, demo_eval = demo_paths()
        eval_path = eval_path or demo_eval
    load = functools.partial(
        load_dataset, tokenizer=tokenizer, mode=cfg.mode, max_len=cfg.max_len, skip_bad_rows=cfg.skip_bad_rows
    )
    train = load(train_path)
    held_out = load(eval_path) if eval_path else None
    counts = adapters.trainable_parameters(model)
    for note in prepared.notes:
        say(note)
    say(f"data {train_path}: {len(train.examples)} examples ({train.format})" + _skipped(train))

    # 2. Held-out metrics before training (the adapter starts as the identity: B = 0).
    before = None
    # Exact match needs no more new tokens than the longest reference answer (+ a margin for its end).
    max_new = min(256, max((_loss_tokens(ex) for ex in held_out.examples), default=0) + 4) if held_out else 0
    evaluate = functools.partial(evaluate, batch_size=cfg.batch_size, max_new_tokens=max_new)
    if held_out is not None and ctx.is_main:
        before = evaluate(model, tokenizer, held_out)
        say(f"before: {_fmt(before)}  ({eval_path}, {len(held_out.examples)} rows)")

    # 3. Train.
    fitted = fit(
        model, train.examples, cfg, pad_id=_pad_id(tokenizer),
        eval_examples=held_out.examples if held_out is not None else None, ctx=ctx, stream=stream,
    )  # fmt: skip

    # 4. Held-out metrics after training, then what the adapter needs, written by rank 0 only.
    results: dict[str, Any] = {}
    engine, after = distributed.engine_of(model), None  # fit put the model under its engine
    if held_out is not None and (ctx.is_main or engine.sharded):  # FSDP: every rank runs the forwards
        with engine.evaluating() as m:
            after = evaluate(m, tokenizer, held_out)
    with engine.gathered_trainable():  # FSDP: the adapter's tensors in full, on every rank
        if ctx.is_main:
            save_prepared(prepared, output)
    if ctx.is_main:
        if after is not None:
            say(f"after:  {_fmt(after)}")
        replace(cfg, resume=False).save(output / "train_config.yaml")
        results = {
            "before": before,
            "after": after,
            "trainable_params": counts.trainable,
            "total_params": counts.total,
            "steps": fitted.steps,
            "train_seconds": round(fitted.seconds, 3),
            "tokens_per_second": round(fitted.tokens_per_second, 1),
            "config": cfg.to_dict(),
        }
        _write_json(output / "results.json", results)
        plot_loss(output / "metrics.jsonl", output / "loss.png")
        checkpoint.remove(output)
        say(f"saved the adapter, train_config.yaml, results.json, metrics.jsonl and loss.png in {output}")
    distributed.barrier(ctx)
    return results


@dataclass
class Fitted:
    steps: int
    tokens: int
    seconds: float  # training time over all sessions of the run (resumes included)
    tokens_per_second: float  # measured in this session


def fit(
    model: torch.nn.Module,
    examples: list,
    cfg: TrainConfig,
    *,
    pad_id: int,
    eval_examples: list | None = None,
    ctx: distributed.Context | None = None,
    stream: TextIO | None = None,
) -> Fitted:
    """Train the trainable parameters of `model` on `examples` (objects with `input_ids` and `labels`).

    Checkpoints, metrics.jsonl and the resume state live in `cfg.output`. Ctrl-C / SIGTERM stop after the
    current step with a checkpoint (then KeyboardInterrupt is raised).

    Raises:
        ValueError: no trainable parameters, no examples, or a checkpoint that does not fit the options.
        NonFiniteLoss: a NaN / inf loss or gradient norm; nothing of that step is applied or saved.
    """
    ctx = ctx or distributed.Context()
    stream = stream or sys.stderr
    say = functools.partial(_say, stream) if ctx.is_main else (lambda *a: None)
    output = Path(cfg.output)
    device = next(p.device for p in model.parameters())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters (add an adapter first)")
    if not examples:
        raise ValueError("no training examples")

    # The run's shape: rows per optimizer step, steps, warmup.
    n = len(examples)
    bs, accum = cfg.batch_size, cfg.grad_accum
    global_batch = bs * accum * ctx.world
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * n / global_batch))
    warmup = round(cfg.warmup * total)
    loss_tokens = [_loss_tokens(ex) for ex in examples]
    row_tokens = [len(ex.input_ids) for ex in examples]

    # Start fresh, or from the newest checkpoint with --resume. The engine (DDP / FSDP) wraps the model
    # after a fresh adapter is broadcast (full tensors) and before a checkpoint is cut into FSDP shards.
    start, tokens_before, seconds_before = 0, 0, 0.0
    found = checkpoint.latest(output)
    if found is not None and not cfg.resume:
        raise ValueError(
            f"{output} holds a checkpoint of an unfinished run ({found.name}): pass --resume to continue it, "
            "or choose another --output"
        )
    if found is None and distributed.engine_of(model) is None:
        distributed.broadcast_params(ctx, list(params.values()))
    engine = distributed.wrap(
        model, ctx, cfg.distributed, lambda *batch: causal_lm_loss(*batch, cfg.loss_chunk)
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # FSDP: now DTensor shards
    plist = list(params.values())
    optimizer = torch.optim.AdamW(plist, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if found is not None:
        ckpt = checkpoint.load(found)
        checkpoint.check_config(ckpt, cfg.to_dict(), global_batch)
        ckpt = distributed.check_resume(ckpt, ctx, cfg.dropout)
        checkpoint.restore(engine.localize(ckpt, params), params, optimizer, ctx.rank)
        start, tokens_before, seconds_before = ckpt.step, ckpt.tokens, ckpt.elapsed
        say(f"resuming from {found} (step {start}/{total})")
    else:
        if cfg.resume:
            say(f"--resume: no checkpoint in {output}; starting from step 0")
        if ctx.world > 1:
            torch.manual_seed(cfg.seed + ctx.rank)  # distinct dropout masks per process
    log = MetricsLog(output / "metrics.jsonl", resume_step=start if start else None) if ctx.is_main else None
    say(
        f"training {total} steps of {global_batch} rows ({bs} x {accum} accumulation x {ctx.world} "
        f"process{'es' if ctx.world > 1 else ''}), lr {cfg.lr:g}, warmup {warmup} steps"
    )

    def save_checkpoint(done: int) -> Path:
        rngs = distributed.gather(ctx, checkpoint.rng_state())
        full, state = engine.full_state(params, optimizer)  # FSDP: every rank gathers the trainable tensors
        path = None
        if ctx.is_main:
            path = checkpoint.save(
                output, step=done, tokens=tokens, elapsed=seconds_before + time.perf_counter() - t0,
                config=cfg.to_dict(), params=full, optimizer=state, rngs=rngs, global_batch=global_batch,
            )  # fmt: skip
        distributed.barrier(ctx)
        return path or checkpoint.root(output)

    progress = Progress(total, start, cfg.log_every, stream if ctx.is_main else _Silent())
    tokens, t0, last_saved = tokens_before, time.perf_counter(), start
    model.train()
    with _StopSignal() as stop:
        for step in range(start, total):
            # The rows of this optimizer step, this process's share, and the step's learning rate.
            rows = step_rows(step, n, global_batch, cfg.seed)
            n_loss = max(1, sum(loss_tokens[i] for i in rows))
            mine = rows[ctx.rank * bs * accum : (ctx.rank + 1) * bs * accum]
            lr = cfg.lr * lr_factor(step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Forward + backward over the micro-batches; gradients add up in .grad.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            # Gradients are summed over ranks once, in the last micro-batch's backward (DDP / FSDP).
            for m in range(accum):
                micro = [examples[i] for i in mine[m * bs : (m + 1) * bs]]
                batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
                with engine.micro_step(last=m == accum - 1):
                    s, _ = engine.loss(batch)
                    (s / n_loss).backward()
                loss_sum += s.detach().double()
            loss = distributed.sum_scalar(ctx, float(loss_sum), device) / n_loss

            # Stop before a bad update reaches the weights; clip; step.
            norm = torch.nn.utils.clip_grad_norm_(plist, cfg.max_grad_norm or math.inf)
            if not (math.isfinite(loss) and math.isfinite(float(norm))):
                optimizer.zero_grad(set_to_none=True)
                progress.close()
                kept = checkpoint.latest(output)
                raise NonFiniteLoss(
                    f"step {step + 1}: the loss is {loss} (gradient norm {float(norm)}); training stopped "
                    "before applying it. "
                    + (
                        f"The last good checkpoint is {kept} ({last_saved} steps): lower --lr or fix the "
                        "data and rerun with --resume"
                        if kept
                        else "No checkpoint was saved (use --save-every N); lower --lr or fix the data"
                    )
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            step_tokens = sum(row_tokens[i] for i in rows)
            tokens += step_tokens

            # Report, evaluate, checkpoint.
            progress.update(done, loss, lr, step_tokens)
            if log is not None:
                log.write(
                    {"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(norm), 6),
                     "tokens": tokens, "tokens_per_second": round(progress.tokens_per_second(), 1),
                     "elapsed": round(seconds_before + time.perf_counter() - t0, 3)}
                )  # fmt: skip
            if cfg.eval_every and eval_examples and (done % cfg.eval_every == 0 or done == total):
                if ctx.is_main or engine.sharded:  # FSDP: every rank takes part in the forwards
                    with engine.evaluating() as m:
                        ev = eval_loss(m, eval_examples, bs, pad_id, cfg.loss_chunk)
                if ctx.is_main:
                    log.write({"step": done, **ev})
                    progress.message(f"step {done}: eval loss {ev['eval_loss']:.4f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < total:
                save_checkpoint(done)
                last_saved = done
            if distributed.any_flag(ctx, stop.requested, device):
                if last_saved != done:
                    save_checkpoint(done)
                progress.close()
                say(
                    f"stopped after step {done}/{total}: checkpoint saved in {checkpoint.root(output)}; "
                    "continue with the same command and --resume"
                )
                raise KeyboardInterrupt
    progress.close()
    model.eval()
    seconds = seconds_before + time.perf_counter() - t0
    return Fitted(total, tokens, seconds, progress.tokens_per_second())


# -- the pieces the loop uses --------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to 0.

    Warmup: (step + 1) / warmup for step < warmup, so no step has lr 0. Cosine over the remaining steps:
    0.5 · (1 + cos(pi · (step - warmup) / (total - warmup))), 1 at the first step after warmup.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_rows(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: rows [step·G, (step+1)·G) of the seeded epoch permutations."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, j = divmod(i, n)
        out.append(_permutation(n, seed, epoch)[j])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


@torch.no_grad()
def eval_loss(model, examples: list, batch_size: int, pad_id: int, chunk: int = 0) -> dict[str, float]:
    """Token-averaged loss and perplexity of `model` on `examples` (eval mode, then back to train mode)."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            s, k = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk)
            total, count = total + float(s), count + k
    finally:
        model.train(was_training)
    loss = total / max(1, count)
    return {"eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(min(loss, 50.0)), 4)}


class _Silent:
    """A stream for the ranks that do not print."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, which then checkpoints.

    A second Ctrl-C interrupts at once. Handlers are only installed from the main thread.
    """

    requested = False

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _loss_tokens(example) -> int:
    """Tokens of `example` that carry a loss (labels shifted by one, as the loss counts them)."""
    return sum(1 for t in example.labels[1:] if t != -100)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _fmt(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.4f}", f"perplexity {metrics['perplexity']:.2f}"]
    if metrics.get("exact_match") is not None:
        parts.append(f"exact match {metrics['exact_match']:.1%}")
    return "  ".join(parts)


def _skipped(dataset) -> str:
    return f", {dataset.skipped} bad rows skipped" if getattr(dataset, "skipped", 0) else ""


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()
