"""The training loop of `lorakit train`, meant to be read top to bottom.

    run(cfg)   prepare the model and data, evaluate, fit, evaluate again, write the adapter and the records
    fit(...)   the optimizer loop: AdamW, warmup + cosine, gradient accumulation, clipping, checkpoints;
               each step: `_Run.train_step` -> `micro_batches` (padded or packed) -> `micro_batch_loss`;
               around the steps (resume, records, evaluation, checkpoints, stops): loop_records.py

The data order is a pure function of (seed, step) (order.py), so a resumed or multi-process run sees exactly
the rows a single uninterrupted run sees, and the checkpoint only needs the step.

The loss of an optimizer step is the sum of token losses over all its rows divided by the number of loss
tokens in all its rows (counted up front from the labels), so accumulating micro-batches, or splitting them
over processes, gives the same gradient as one big batch. For the same reason packing (`packing.py`: a step's
rows packed into fewer, fuller micro-batches) gives the padded path's gradient: it regroups a step's rows,
never moves a row to another step.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from ..data import collate, pad_id_of
from ..fast import offload_activations, set_recompute
from ..losses import causal_lm_loss
from . import distributed, optim, packing, scaffold, tracking
from .compile import compiled
from .config import TrainConfig
from .evaluate import format_metrics, skipped_note
from .loop_records import NonFiniteLoss, RunRecords  # noqa: F401 (NonFiniteLoss: imported from here too)
from .metrics import MetricsLog, Progress
from .order import step_rows
from .preference.objective import MODES as PREFERENCE_MODES
from .preference.objective import objective_for
from .row_attention import WIDEST as row_attention_widest
from .row_attention import row_attention
from .run_defaults import common_system
from .signals import _Silent, _StopSignal


def run(cfg: TrainConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Train as `cfg` says; write the adapter and the run's records into `cfg.output`.

    `cfg.data=None` trains on the embedded demo dataset (and evaluates on its held-out split). Writes, on
    rank 0: the adapter (PEFT format; + the tokenizer when the vocabulary grew), `train_config.yaml`,
    `results.json`, `metrics.jsonl` and `loss.png`.

    Returns:
        results.json's dict: {"before", "after" (evaluate() metrics or None), "trainable_params",
        "total_params", "steps", "train_seconds", "tokens_per_second", "packing" (token counts of the
        micro-batches, packed or padded: `packing.Stats.to_dict`), "config"}.
    Raises:
        ValueError / FileNotFoundError: bad options, model or data (naming them).
        NonFiniteLoss: the loss diverged (the last checkpoint is kept).
        KeyboardInterrupt: Ctrl-C or SIGTERM, after saving a checkpoint to resume from.
    """
    ctx = distributed.init(cfg.distributed)
    if cfg.device != "auto" and ctx.world == 1:
        from ..models import resolve_device

        ctx = replace(ctx, device=resolve_device(cfg.device))
    try:
        _check_offload(cfg, ctx.device)  # before the model loads
        return _run(cfg, ctx, stream or sys.stderr)
    finally:
        distributed.close(ctx)


def _run(cfg: TrainConfig, ctx: distributed.Context, stream: TextIO) -> dict[str, Any]:
    from lorakit import adapters

    from .evaluate import evaluate

    if cfg.mode in PREFERENCE_MODES:  # dpo / orpo / kto: their own data and metrics, this file's fit
        from .preference.run import run_preference

        return run_preference(cfg, ctx, stream)
    if cfg.mode == "grpo":  # rollouts from the live adapter, reward functions (preference/grpo_run.py)
        from .preference.grpo_run import run_grpo

        return run_grpo(cfg, ctx, stream)
    say = scaffold.sayer(stream, ctx)
    done = scaffold.finished_run(cfg, ctx, say)
    if done is not None:
        return done

    # 1. The model with a fresh adapter, and the data tokenized by its tokenizer.
    prepared = scaffold.prepare_model(cfg, ctx, say)
    model, tokenizer = prepared.model, prepared.tokenizer
    train, held_out, eval_path = _load_data(cfg, prepared, say)
    counts = adapters.trainable_parameters(model)

    # 2. Held-out metrics before training (the adapter starts as the identity: B = 0).
    before = None
    # Exact match needs no more new tokens than the longest reference answer (+ a margin for its end).
    max_new = min(256, max((_loss_tokens(ex) for ex in held_out.examples), default=0) + 4) if held_out else 0
    evaluate = functools.partial(
        evaluate, batch_size=cfg.batch_size, max_new_tokens=max_new, progress=stream if ctx.is_main else None
    )
    if held_out is not None and ctx.is_main:
        before = evaluate(model, tokenizer, held_out)
        say(f"before: {format_metrics(before)}  ({eval_path}, {len(held_out.examples)} rows)")

    # 3. Train (records also go to the --report-to trackers).
    if ctx.is_main:
        tracking.start(cfg, Path(cfg.output))
    fitted = fit(
        model, train.examples, cfg, pad_id=pad_id_of(tokenizer),
        eval_examples=held_out.examples if held_out is not None else None, ctx=ctx, stream=stream,
    )  # fmt: skip

    # 4. Held-out metrics after training, then what the adapter needs, written by rank 0 only.
    results: dict[str, Any] = {}
    held_out_metrics = (
        functools.partial(evaluate, tokenizer=tokenizer, dataset=held_out) if held_out is not None else None
    )
    after = scaffold.evaluate_and_save(model, prepared, cfg, ctx, held_out_metrics)
    if ctx.is_main:
        if after is not None:
            say(f"after:  {format_metrics(after)}")
        results = scaffold.results_of(cfg, counts, fitted, before, after, packing=fitted.packing)
        scaffold.write_records(cfg, results, say, train=train)
    distributed.barrier(ctx)
    return results


def _load_data(cfg: TrainConfig, prepared, say):
    """(train Dataset, held-out Dataset or None, held-out path) tokenized by the prepared tokenizer; the
    embedded demo when --data is not given; `--init eva` re-makes the adapter from the training rows."""
    from lorakit.data import demo_paths, load_dataset

    from .evaluate import describe_dataset

    train_path, eval_path = cfg.data, cfg.eval_data
    if train_path is None:
        train_path, demo_eval = demo_paths()
        eval_path = eval_path or demo_eval
    load = functools.partial(
        load_dataset, tokenizer=prepared.tokenizer, mode=cfg.mode, max_len=cfg.max_len,
        skip_bad_rows=cfg.skip_bad_rows, truncate=cfg.truncate,
    )  # fmt: skip
    train = load(train_path)
    # Held-out rows without a system prompt get the one every training row shared, as `lorakit eval` of the
    # saved adapter gives them (run_defaults), so both report the same numbers.
    held_out = load(eval_path, system=common_system(train.rows, train.format)) if eval_path else None
    if cfg.init == "eva":
        from .eva_init import reinit_with_eva

        reinit_with_eva(prepared, train.examples, cfg.batch_size, pad_id_of(prepared.tokenizer), say)
    say(f"data {train_path}: {describe_dataset(train)}" + skipped_note(train))
    return train, held_out, eval_path


@dataclass
class Fitted:
    steps: int
    tokens: int
    seconds: float  # training time over all sessions of the run (resumes included)
    tokens_per_second: float  # measured in this session
    packing: dict | None = None  # packing.Stats.to_dict of this session's micro-batches


def fit(
    model: torch.nn.Module,
    examples: list,
    cfg: TrainConfig,
    *,
    pad_id: int,
    eval_examples: list | None = None,
    ctx: distributed.Context | None = None,
    stream: TextIO | None = None,
    objective=None,
) -> Fitted:
    """Train the trainable parameters of `model` on `examples` (objects with `input_ids` and `labels`).

    Checkpoints, metrics.jsonl and the resume state live in `cfg.output`. Ctrl-C / SIGTERM stop after the
    current step with a checkpoint (then KeyboardInterrupt is raised). `objective`: the micro-batch loss
    (GRPO's, built with its reward functions and engine); None: the one `cfg.mode` implies.

    Raises:
        ValueError: no trainable parameters, no examples, a checkpoint that does not fit the options, or
            packing=True for a model that cannot keep packed rows apart.
        NonFiniteLoss: a NaN / inf loss or gradient norm; nothing of that step is saved, nothing of that
            update applied (with GRPO's μ updates a step, its earlier updates are, in memory only).
    """
    ctx = ctx or distributed.Context()
    stream = stream or sys.stderr
    say = scaffold.sayer(stream, ctx)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters (add an adapter first)")
    if not examples:
        raise ValueError("no training examples")
    session = _Run(model, examples, cfg, ctx, params, pad_id, eval_examples, stream, say, objective)
    # Preference objectives batch their own (paired) rows: packing is for token-level losses. The probe runs
    # the plain model, before DDP wraps it; under FSDP the base is sharded and every micro-batch is padded.
    if cfg.distributed == "fsdp" and session.objective is None:
        if cfg.packing:
            raise ValueError("--packing with --distributed fsdp is not supported: use --no-packing or ddp")
        say("packing off under --distributed fsdp: each micro-batch is padded")
    elif session.objective is None:
        session.packed = packing.choose(model, cfg.packing, say)
    session.start_or_resume()
    if session.packed:
        say(
            f"packing: each step's rows in sequences, at most {cfg.batch_size * cfg.max_len} tokens a "
            "micro-batch (batch size x max len), attention kept per row"
        )
    say(
        f"training {session.total} steps of {session.global_batch} rows ({cfg.batch_size} x {cfg.grad_accum} "
        f"accumulation x {ctx.world} process{'es' if ctx.world > 1 else ''}), lr {cfg.lr:g}, "
        f"warmup {session.warmup} steps" + optim.describe(cfg)
    )
    session.progress = Progress(
        session.total, session.start, cfg.log_every, stream if ctx.is_main else _Silent()
    )
    session.t0 = time.perf_counter()
    model.train()
    # Packed rows' attention row by row (under --compile as one opaque operator, switched before compiling).
    rows = row_attention(model, session.packed, compiled=cfg.compile)
    with _StopSignal() as stop, rows as by_rows, compiled(model, cfg.compile):
        if by_rows:  # a row's attention then costs the same in any bin: pack tightly
            session.attention, session.widest = 0.0, max(cfg.max_len, row_attention_widest)
            session.one_sequence = cfg.compile  # a micro-batch of one sequence: one shape but its length
        for step in range(session.start, session.total):
            loss, norm, lr, step_tokens = session.train_step(step)
            session.after_step(step + 1, loss, norm, lr, step_tokens, stop.requested)
    if cfg.save_every and session.last_saved < session.total:
        # The trained state, so that a kill during the final evaluation and saves resumes without retraining.
        session.save_checkpoint(session.total)
    session.progress.close()
    model.eval()
    say(session.stats.line(session.packed))
    seconds = session.seconds_before + time.perf_counter() - session.t0
    return Fitted(
        session.total,
        session.tokens,
        seconds,
        session.progress.tokens_per_second(),
        session.stats.to_dict(session.packed),
    )


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int, warmup: int) -> float:
    """The schedule: set and return the lr of optimizer step `step` (0-based), cfg.lr x the --scheduler's
    factor (`optim.lr_factor`; LoRA+ groups keep their ratio, `optim.set_lr`)."""
    lr = cfg.lr * optim.lr_factor(step, total, warmup, cfg.scheduler)
    optim.set_lr(optimizer, lr)
    return lr


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig):
    """Summed token loss of one micro-batch and its loss-token count: `causal_lm_loss` of the batch.

    `batch` is `collate`'s padded dict (input_ids, attention_mask, labels) or `packing.collate_packed`'s
    (input_ids, labels, position_ids), on the model's device. The loop divides by the loss tokens of the whole
    optimizer step, so summing over micro-batches (and processes) gives one big batch's mean.
    """
    return causal_lm_loss(
        model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], cfg.loss_chunk,
        position_ids=batch.get("position_ids"),
    )  # fmt: skip


class _Run(RunRecords):
    """The state of one `fit`: its shape, the optimizer, the step counters, and the step's pieces."""

    def __init__(self, model, examples, cfg, ctx, params, pad_id, eval_examples, stream, say, objective=None):
        self.model, self.examples, self.cfg, self.ctx = model, examples, cfg, ctx
        self.params, self.plist = params, list(params.values())
        self.pad_id, self.eval_examples, self.stream, self.say = pad_id, eval_examples, stream, say
        self.output = Path(cfg.output)
        self.device = next(p.device for p in model.parameters())
        # The run's shape: rows per optimizer step, steps, warmup.
        n = len(examples)
        self.global_batch = cfg.batch_size * cfg.grad_accum * ctx.world
        self.total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * n / self.global_batch))
        self.warmup = round(cfg.warmup * self.total)
        # The micro-batch loss: token-level (sft, cpt) or a preference objective (dpo, orpo, kto; its units are
        # pairs or rows, so the step's loss is the mean over them).
        self.objective = objective if objective is not None else objective_for(cfg)
        obj = self.objective
        self.loss_tokens = [obj.units(ex) if obj else _loss_tokens(ex) for ex in examples]
        self.row_tokens = [obj.tokens(ex) if obj else len(ex.input_ids) for ex in examples]
        self.extra: dict[str, float] = {}  # the last step's objective metrics (reward accuracy, margin, ...)
        self.start, self.tokens, self.seconds_before, self.last_saved = 0, 0, 0.0, 0
        self.packed, self.stats = False, packing.Stats()
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        # packing.plan's attention weight; below ~512 wide, per-op overhead, not attention, dominates a step.
        self.attention = 1.0 / (6 * max(512, hidden)) if isinstance(hidden, int) else 0.0
        self.widest: int | None = None  # packing.plan's widest bin (None: up to the micro-batch budget)
        self.one_sequence = False  # packed micro-batches of one sequence each (packing.sequences)
        self.log: MetricsLog | None = None
        # Memory for time, per option (numerics unchanged): LoRA inputs rebuilt in backward or saved; what
        # autograd keeps offloaded to CPU memory during each micro-batch's forward (back in backward).
        _check_offload(cfg)
        set_recompute(model, cfg.recompute_inputs)
        self.offload = (
            functools.partial(offload_activations, model) if cfg.offload_activations else nullcontext
        )
        self.progress: Progress | None = None
        self.t0 = time.perf_counter()

    def micro_batches(self, mine: list[int]):
        """This process's rows of a step as micro-batches on the device: `batch_size` rows padded, or packed
        bins (`packing.plan`) when packing. Counts the tokens computed into self.stats."""
        cfg, bs = self.cfg, self.cfg.batch_size
        lengths = [self.row_tokens[i] for i in mine]
        stats = packing.Stats(real=sum(lengths), rows=len(mine), padded=packing.padded_tokens(lengths, bs))
        if self.packed:
            # A row longer than max_len (fit called directly) gets a bin of its own.
            capacity = max([cfg.max_len, *lengths])
            if self.one_sequence:
                layout = packing.sequences(lengths, bs * capacity)
            else:
                layout = packing.plan(lengths, capacity, bs, self.attention, self.widest)
            groups = [[[mine[j] for j in b] for b in mb] for mb in layout]
        else:
            groups = [[[i] for i in mine[m : m + bs]] for m in range(0, len(mine), bs)]
        for bins in groups:
            rows = [[self.examples[i] for i in b] for b in bins]
            if self.packed:
                batch = packing.collate_packed(rows, self.pad_id)
            else:
                batch = collate(sum(rows, []), self.pad_id)
            stats.computed += batch["input_ids"].numel()
            stats.sequences += len(bins)
            stats.micro_batches += 1
            yield {k: v.to(self.device) for k, v in batch.items()}
        self.stats.add(stats)

    def train_step(self, step: int) -> tuple[float, float, float, int]:
        """Forward + backward of optimizer step `step` over its micro-batches, then clip and update.

        An objective with `updates` (GRPO with --grpo-iterations μ > 1) makes one step μ optimizer updates
        over the same rows; the schedule then counts updates (update j of step s is s·μ + j of total·μ).
        Returns (loss, grad norm: means over the updates; the first update's lr; tokens of the step's rows).
        Raises NonFiniteLoss before the update.
        """
        ctx, bs, accum = self.ctx, self.cfg.batch_size, self.cfg.grad_accum
        rows = step_rows(step, len(self.examples), self.global_batch, self.cfg.seed)
        n_loss = max(1, sum(self.loss_tokens[i] for i in rows))
        mine = rows[ctx.rank * bs * accum : (ctx.rank + 1) * bs * accum]
        if self.objective is not None:
            obj, pad = self.objective, self.pad_id
            micros = [[self.examples[i] for i in mine[m * bs : (m + 1) * bs]] for m in range(accum)]
            if hasattr(obj, "updates"):  # GRPO: rollouts, then grpo_iterations updates over them
                updates = obj.updates(micros, pad)
            else:
                shared = obj.step_options(self.engine, micros, pad, ctx)  # KTO: the step's KL reference point
                updates = [
                    [functools.partial(obj.micro_loss, examples=m, pad_id=pad, **shared) for m in micros]
                ]
        else:
            updates = [
                [functools.partial(micro_batch_loss, batch=b, cfg=self.cfg) for b in self.micro_batches(mine)]
            ]
        mu, extra = len(updates), {}
        done = [self.update(fns, n_loss, step, step * mu + j, mu, extra) for j, fns in enumerate(updates)]
        self.extra = {
            k: round(distributed.sum_scalar(ctx, v, self.device) / n_loss, 6) for k, v in extra.items()
        }
        loss, norm = sum(d[0] for d in done) / mu, sum(d[1] for d in done) / mu
        return loss, norm, done[0][2], sum(self.row_tokens[i] for i in rows)

    def update(self, steps: list, n_loss: int, step: int, update: int, mu: int, extra: dict):
        """One optimizer update (`update` of total·mu) over the micro-batch calls `steps`; adds their metric
        sums to `extra`. Returns (loss, grad norm, lr)."""
        ctx = self.ctx
        lr = set_lr(self.optimizer, self.cfg, update, self.total * mu, self.warmup * mu)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # Each micro-batch's loss runs inside the engine's wrapper (DDP / FSDP see the forward); gradients
        # are summed over ranks once, in the last micro-batch's backward.
        for m, fn in enumerate(steps):
            with self.engine.micro_step(last=m == len(steps) - 1):
                with self.offload():
                    s, _, *sums = self.engine.run(fn)
                (s / n_loss).backward()
            for k, v in (sums[0] if sums else {}).items():
                extra[k] = extra.get(k, 0.0) + v
            loss_sum += s.detach().double()
        loss = distributed.sum_scalar(ctx, float(loss_sum), self.device) / n_loss
        # Stop before a bad update reaches the weights; clip; step.
        norm = float(torch.nn.utils.clip_grad_norm_(self.plist, self.cfg.max_grad_norm or math.inf))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.close()
            raise self.non_finite(step, loss, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, lr


# -- the pieces the loop uses --------------------------------------------------------------------------------


def _check_offload(cfg: TrainConfig, device: torch.device | None = None) -> None:
    """--offload-activations is refused under FSDP (offload_activations tells parameters from activations by
    their storage, which FSDP2's sharded DTensor parameters do not expose) and, given the run's `device`, on
    a CPU: the activations are in CPU memory already, so the copies would cost time and free nothing. (`fit`
    itself offloads on any device: on a CPU it copies, exactly, as fast.offload_activations does.)"""
    if not cfg.offload_activations:
        return
    if cfg.distributed == "fsdp":
        raise ValueError("--offload-activations with --distributed fsdp is not supported: use ddp or drop it")
    if device is not None and torch.device(device).type == "cpu":
        raise ValueError(
            "--offload-activations moves what backward needs from an accelerator to CPU memory, but this run "
            "trains on cpu, where it is already: drop the flag (or train on a GPU, --device cuda)"
        )


def _loss_tokens(example) -> int:
    """Tokens of `example` that carry a loss (labels shifted by one, as the loss counts them)."""
    return sum(1 for t in example.labels[1:] if t != -100)
