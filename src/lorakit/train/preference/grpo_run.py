"""`lorakit train --mode grpo --reward SPEC`: prompt rows, rollouts from the live adapter, the shared fit.

The steps of a preference run (run.py): prepare the model and adapter, read the data, evaluate, `fit`, evaluate
again, write the adapter, train_config.yaml, results.json, metrics.jsonl and loss.png. What differs: the rows
are prompts (data/prompts.py), the reward functions (rewards.py), the rollout engine (rollout.py, started
once for the run over the training model) and the loss (grpo.py). Held-out metrics are those of greedy
completions: the mean reward of each function and the exact match of the final answer.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, TextIO

from ...data import pad_id_of
from .. import distributed, scaffold, tracking
from ..config import TrainConfig
from .grpo import GrpoObjective
from .rewards import completion_text, load_rewards
from .rollout import LiveEngine

SHIPPED = "src/lorakit/data/grpo_demo/train.jsonl"


def run_grpo(cfg: TrainConfig, ctx: distributed.Context, stream: TextIO) -> dict[str, Any]:
    """Train `--mode grpo`; see `lorakit.train.loop.run` for what is written and returned.

    Raises:
        ValueError: no --data, --distributed fsdp, bad options or data. RewardError: a bad --reward.
    """
    from lorakit import adapters
    from lorakit.data.prompts import load_prompts

    from ..loop import fit
    from ..prepare import save_prepared

    if cfg.data is None:
        raise ValueError(
            f"--mode grpo needs --data: a file of prompt rows with the fields the rewards read (see "
            f"`lorakit.data.prompts`); a shipped example: --data {SHIPPED} --reward exact"
        )
    if cfg.distributed == "fsdp":
        raise ValueError("--mode grpo with --distributed fsdp is not supported: the rollout engine needs the "
                         "whole model on each process (use ddp)")  # fmt: skip
    rewards = load_rewards(cfg.rewards())  # before the model loads: a bad spec fails at once
    say = scaffold.sayer(stream, ctx)
    done = scaffold.finished_run(cfg, ctx, say)
    if done is not None:
        return done
    prepared = scaffold.prepare_model(cfg, ctx, say)
    model, tokenizer = prepared.model, prepared.tokenizer
    load = functools.partial(
        load_prompts, tokenizer=tokenizer, max_len=cfg.max_len, max_new_tokens=cfg.max_new_tokens,
        required=tuple(r.field for r in rewards if r.field), skip_bad_rows=cfg.skip_bad_rows,
    )  # fmt: skip
    train = load(cfg.data)
    held_out = load(cfg.eval_data) if cfg.eval_data else None
    counts = adapters.trainable_parameters(model)
    say(_describe(cfg, train, rewards))
    engine = LiveEngine(model, tokenizer, max_batch=cfg.batch_size * cfg.num_generations).start()
    try:
        objective = GrpoObjective(
            rewards, engine, cfg.num_generations, cfg.temperature, cfg.max_new_tokens, cfg.beta,
            next((r.field for r in rewards if r.field), "answer"), cfg.grpo_iterations, cfg.epsilon,
            cfg.epsilon_high,
        )  # fmt: skip
        evaluate = functools.partial(evaluate_grpo, objective=objective, batch_size=cfg.batch_size)
        before = evaluate(held_out.examples) if held_out is not None and ctx.is_main else None
        if before is not None:
            say(f"before: {format_metrics(before)}  ({cfg.eval_data}, {len(held_out.examples)} rows, greedy)")
        if ctx.is_main:
            tracking.start(cfg, Path(cfg.output))  # --report-to
        fitted = fit(
            model, train.examples, cfg, pad_id=pad_id_of(tokenizer), ctx=ctx, stream=stream, objective=objective,
            eval_examples=held_out.examples if held_out is not None else None,
        )  # fmt: skip
        after = evaluate(held_out.examples) if held_out is not None and ctx.is_main else None
    finally:
        engine.stop()
    results: dict[str, Any] = {}
    if ctx.is_main:
        if after is not None:
            say(f"after:  {format_metrics(after)}")
        save_prepared(prepared, Path(cfg.output))
        results = scaffold.results_of(cfg, counts, fitted, before, after)
        scaffold.write_records(cfg, results, say)
    distributed.barrier(ctx)
    return results


def _describe(cfg: TrainConfig, train, rewards) -> str:
    """The run's data line: prompts, rewards, completions per prompt, updates per rollout batch."""
    skipped = f", {train.skipped} bad rows skipped" if train.skipped else ""
    high = f", epsilon high {cfg.epsilon_high:g}" if cfg.epsilon_high is not None else ""
    passes = f"; {cfg.grpo_iterations} updates per rollout batch (clip epsilon {cfg.epsilon:g}{high})"
    return (
        f"data {cfg.data}: {len(train.examples)} prompts ({train.format}){skipped}; rewards: "
        f"{', '.join(r.spec for r in rewards)}; {cfg.num_generations} completions each"
        f"{passes if cfg.grpo_iterations > 1 else ''}"
    )


def evaluate_grpo(examples: list, *, objective: GrpoObjective, batch_size: int) -> dict[str, Any]:
    """Held-out metrics of greedy completions: reward (the sum over the functions), reward_<name>,
    exact_match (when the rows have the reference field), completion_length (means), n, and 3 samples."""
    metrics: dict[str, Any] = {
        k.removeprefix("eval_"): v for k, v in objective.evaluate(None, examples, batch_size, 0).items()
    }
    metrics.setdefault("exact_match", None)
    metrics["n"] = len(examples)
    shown = examples[:3]
    metrics["samples"] = [
        {
            "prompt": ex.prompt,
            "reference": ex.fields.get(objective.answer_field),
            "generated": completion_text(r.text),
        }
        for ex, r in zip(shown, objective.rollouts(shown, 1, 0.0))
    ]
    return metrics


def format_metrics(m: dict) -> str:
    parts = [f"reward {m['reward']:.3f}"]
    parts += [f"{k.removeprefix('reward_')} {v:.3f}" for k, v in m.items() if k.startswith("reward_")]
    if m.get("exact_match") is not None:
        parts.append(f"exact match {m['exact_match']:.1%}")
    parts.append(f"length {m['completion_length']:.1f}")
    return "  ".join(parts)
