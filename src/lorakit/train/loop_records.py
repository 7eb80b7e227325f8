"""What `fit` does around its steps (loop.py's `_Run`): start or resume, report, evaluate, checkpoint, stop.

`RunRecords` is a mixin of `_Run` and uses its state (cfg, ctx, model, params, optimizer, engine, step
counters). A checkpoint holds the step, the trainable tensors, the optimizer and the RNG states (checkpoint.py);
metrics.jsonl gets one record per step and one per evaluation. A stop request (Ctrl-C, SIGTERM) checkpoints
and raises KeyboardInterrupt; a non-finite loss raises NonFiniteLoss naming the last good checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import checkpoint, distributed, optim
from .evaluate import eval_loss
from .metrics import MetricsLog


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stopped before applying the step."""


class RunRecords:
    """Resume, per-step records, periodic evaluation and checkpoints of one `fit` (see the module docstring)."""

    def start_or_resume(self) -> None:
        """Start fresh, or from the newest checkpoint with --resume; put the model under its engine (single,
        DDP or FSDP) and build the optimizer on the engine's parameters; open metrics.jsonl.

        A fresh adapter is broadcast (full tensors) before the engine wraps the model; a checkpoint (full
        tensors) is cut into this rank's FSDP shards after."""
        cfg, ctx, output = self.cfg, self.ctx, self.output
        found = checkpoint.latest(output)
        if found is not None and not cfg.resume:
            raise ValueError(
                f"{output} holds a checkpoint of an unfinished run ({found.name}): pass --resume to continue "
                "it, or choose another --output"
            )
        if found is None and distributed.engine_of(self.model) is None:
            distributed.broadcast_params(ctx, self.plist)
        self.engine = distributed.wrap(self.model, ctx, cfg.distributed)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}  # FSDP: DTensors
        self.plist = list(self.params.values())
        self.optimizer = optim.build(self.params, cfg)  # --optimizer, LoRA+ param groups
        if found is not None:
            ckpt = checkpoint.load(found)
            checkpoint.check_config(ckpt, cfg.to_dict(), self.global_batch)
            ckpt = distributed.check_resume(ckpt, ctx, cfg.dropout)
            checkpoint.restore(self.engine.localize(ckpt, self.params), self.params, self.optimizer, ctx.rank)
            optim.after_restore(self.optimizer)
            self.start, self.tokens, self.seconds_before = ckpt.step, ckpt.tokens, ckpt.elapsed
            self.say(f"resuming from {found} (step {self.start}/{self.total})")
        else:
            if cfg.resume:
                self.say(f"--resume: no checkpoint in {output}; starting from step 0")
            if ctx.is_main:
                checkpoint.discard_results(output)  # this output now holds an unfinished run
            if ctx.world > 1:
                torch.manual_seed(cfg.seed + ctx.rank)  # distinct dropout masks per process
        self.last_saved = self.start
        if ctx.is_main:
            self.log = MetricsLog(output / "metrics.jsonl", resume_step=self.start or None)

    def non_finite(self, step: int, loss: float, norm: float) -> NonFiniteLoss:
        kept = checkpoint.latest(self.output)
        return NonFiniteLoss(
            f"step {step + 1}: the loss is {loss} (gradient norm {norm}); training stopped before applying it. "
            + (
                f"The last good checkpoint is {kept} ({self.last_saved} steps): lower --lr or fix the data and "
                "rerun with --resume"
                if kept
                else "No checkpoint was saved (use --save-every N); lower --lr or fix the data"
            )
        )

    def after_step(
        self, done: int, loss: float, norm: float, lr: float, step_tokens: int, stop: bool
    ) -> None:
        """Report, evaluate, checkpoint; on a stop request, checkpoint and raise KeyboardInterrupt."""
        cfg, ctx = self.cfg, self.ctx
        self.tokens += step_tokens
        self.progress.update(done, loss, lr, step_tokens, self.extra)
        if self.log is not None:
            self.log.write(
                {"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
                 "tokens": self.tokens, "tokens_per_second": round(self.progress.tokens_per_second(), 1),
                 "elapsed": round(self.elapsed(), 3), **self.extra}
            )  # fmt: skip
        if cfg.eval_every and self.eval_examples and (done % cfg.eval_every == 0 or done == self.total):
            ev = None
            if ctx.is_main or self.engine.sharded:  # FSDP: every rank takes part in the forwards
                with self.engine.evaluating() as m:
                    ev = (
                        self.objective.evaluate(m, self.eval_examples, cfg.batch_size, self.pad_id)
                        if self.objective
                        else eval_loss(m, self.eval_examples, cfg.batch_size, self.pad_id, cfg.loss_chunk)
                    )
            if ctx.is_main:
                self.log.write({"step": done, **ev})
                shown = self.objective.describe(ev) if hasattr(self.objective, "describe") else None
                if shown is None:
                    keys = ("reward_accuracy", "reward_margin", "kl")
                    extra = "".join(f"  {k} {ev['eval_' + k]:.3f}" for k in keys if "eval_" + k in ev)
                    shown = f"eval loss {ev['eval_loss']:.4f}{extra}"
                self.progress.message(f"step {done}: {shown}")
        if cfg.save_every and done % cfg.save_every == 0 and done < self.total:
            self.save_checkpoint(done)
        if distributed.any_flag(ctx, stop, self.device):
            if self.last_saved != done:
                self.save_checkpoint(done)
            self.progress.close()
            self.say(
                f"stopped after step {done}/{self.total}: checkpoint saved in {checkpoint.root(self.output)}; "
                "continue with the same command and --resume"
            )
            raise KeyboardInterrupt

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def save_checkpoint(self, done: int) -> Path:
        ctx = self.ctx
        rngs = distributed.gather(ctx, checkpoint.rng_state())
        # FSDP: every rank gathers the trainable tensors (never the frozen base).
        full, state = self.engine.full_state(self.params, self.optimizer)
        path = None
        if ctx.is_main:
            path = checkpoint.save(
                self.output, step=done, tokens=self.tokens, elapsed=self.elapsed(), config=self.cfg.to_dict(),
                params=full, optimizer=state, rngs=rngs, global_batch=self.global_batch,
            )  # fmt: skip
        distributed.barrier(ctx)
        self.last_saved = done
        return path or checkpoint.root(self.output)
