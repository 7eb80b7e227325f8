"""`lorakit train --mode dpo|orpo|kto`: preference data, held-out metrics before / after, the shared fit.

The same steps as an SFT run (train/loop.py `_run`): prepare the model and adapter, read the data, evaluate,
`fit`, evaluate again, write the adapter, train_config.yaml, results.json, metrics.jsonl and loss.png. What
differs: the rows (data/preference.py), the micro-batch loss (objective.py) and the held-out metrics below.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, TextIO

import torch

from ...data import pad_id_of
from .. import distributed, scaffold, tracking
from ..config import TrainConfig
from .objective import objective_for, precompute_reference, sequence_logps


def run_preference(cfg: TrainConfig, ctx: distributed.Context, stream: TextIO) -> dict[str, Any]:
    """Train `cfg.mode` in {"dpo", "orpo", "kto"}; see `lorakit.train.loop.run` for what is written.

    Raises:
        ValueError: no --data (preference modes have no embedded default dataset), or bad options / data.
    """
    from lorakit import adapters
    from lorakit.data.preference import load_preference

    from ..loop import fit

    if cfg.data is None:
        raise ValueError(
            f"--mode {cfg.mode} needs --data: a file of preference rows (see `lorakit.data.preference`); "
            "the embedded demo is SFT data. A shipped example: --data src/lorakit/data/dpo_demo/train.jsonl "
            "(scripts/make_dpo_demo_data.py)"
        )
    say = scaffold.sayer(stream, ctx)
    done = scaffold.finished_run(cfg, ctx, say)
    if done is not None:  # as SFT: --resume of a finished run does nothing
        return done
    prepared = scaffold.prepare_model(cfg, ctx, say)
    model, tokenizer = prepared.model, prepared.tokenizer
    output = Path(cfg.output)
    load = functools.partial(
        load_preference, tokenizer=tokenizer, mode=cfg.mode, max_len=cfg.max_len, skip_bad_rows=cfg.skip_bad_rows
    )  # fmt: skip
    train = load(cfg.data)
    held_out = load(cfg.eval_data) if cfg.eval_data else None
    counts = adapters.trainable_parameters(model)
    skipped = f", {train.skipped} bad rows skipped" if train.skipped else ""
    say(f"data {cfg.data}: {len(train.examples)} rows of {train.format} ({cfg.mode}){skipped}")
    pad_id = pad_id_of(tokenizer)

    evaluate = functools.partial(evaluate_preference, cfg=cfg, tokenizer=tokenizer, pad_id=pad_id)
    before = evaluate(model, held_out.examples) if held_out is not None and ctx.is_main else None
    if before is not None:
        say(f"before: {format_metrics(before)}  ({cfg.eval_data}, {len(held_out.examples)} rows)")
    if cfg.precompute_ref and cfg.mode != "orpo":
        precompute_reference(model, train.examples, cfg.batch_size, pad_id)
        say(f"reference log-probs precomputed for {len(train.examples)} rows (adapter disabled)")

    if ctx.is_main:
        tracking.start(cfg, output)  # --report-to
    fitted = fit(
        model, train.examples, cfg, pad_id=pad_id,
        eval_examples=held_out.examples if held_out is not None else None, ctx=ctx, stream=stream,
    )  # fmt: skip

    results: dict[str, Any] = {}
    held_out_metrics = (
        functools.partial(evaluate, examples=held_out.examples) if held_out is not None else None
    )
    after = scaffold.evaluate_and_save(model, prepared, cfg, ctx, held_out_metrics)
    if ctx.is_main:
        if after is not None:
            say(f"after:  {format_metrics(after)}")
        results = scaffold.results_of(cfg, counts, fitted, before, after)
        scaffold.write_records(cfg, results, say)
    distributed.barrier(ctx)
    return results


@torch.no_grad()
def evaluate_preference(model, examples: list, *, cfg: TrainConfig, tokenizer, pad_id: int) -> dict[str, Any]:
    """Held-out metrics of a preference run.

    - loss, reward_accuracy, reward_margin, logps_* (the objective's eval metrics, means over rows; before
      training the adapter is the identity, so DPO / KTO rewards are all 0 and the accuracy is 0);
    - preference_accuracy (pairs): the fraction of pairs where the model itself gives the chosen answer a
      higher summed log-prob than the rejected one, which is meaningful before training too;
    - exact_match: greedy output from the prompt equals the chosen (KTO: desirable) answer, whitespace stripped.
    """
    from ..evaluate import generate_answers

    objective = objective_for(cfg)
    metrics = {
        k.removeprefix("eval_"): v
        for k, v in objective.evaluate(model, examples, cfg.batch_size, pad_id).items()
    }
    was_training = model.training
    model.eval()
    try:
        targets = examples
        if cfg.mode == "kto":
            targets = [ex for ex in examples if ex.label]
        else:
            device = next(p.device for p in model.parameters())
            wins = 0
            from lorakit.data.preference import collate_pairs

            for i in range(0, len(examples), cfg.batch_size):
                b = {
                    k: v.to(device)
                    for k, v in collate_pairs(examples[i : i + cfg.batch_size], pad_id).items()
                }
                chosen, rejected = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])[
                    0
                ].chunk(2)
                wins += int((chosen > rejected).sum())
            metrics["preference_accuracy"] = wins / max(1, len(examples))
        refs = [ex.answer for ex in targets]
        budget = max(
            (
                len(ex.chosen.input_ids if hasattr(ex, "chosen") else ex.example.input_ids)
                - len(ex.prompt_ids)
                for ex in targets
            ),
            default=0,
        )
        outs = generate_answers(
            model, tokenizer, [ex.prompt_ids for ex in targets], budget + 8, cfg.batch_size
        )
        hits = [o.strip() == r.strip() for o, r in zip(outs, refs)]
        metrics["exact_match"] = sum(hits) / len(hits) if hits else None
        metrics["n"] = len(examples)
        metrics["samples"] = [{"reference": r, "generated": o} for r, o in list(zip(refs, outs))[:3]]
    finally:
        model.train(was_training)
    return metrics


def format_metrics(m: dict) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    for key, name in (("reward_accuracy", "reward acc"), ("preference_accuracy", "prefers chosen")):
        if m.get(key) is not None:
            parts.append(f"{name} {m[key]:.1%}")
    if m.get("reward_margin") is not None:
        parts.append(f"margin {m['reward_margin']:.3f}")
    if m.get("exact_match") is not None:
        parts.append(f"exact match {m['exact_match']:.1%}")
    return "  ".join(parts)
