"""What every mode's run does before and after its `fit`: SFT / CPT (loop.py), DPO / ORPO / KTO
(preference/run.py) and GRPO (preference/grpo_run.py) share these, so a finished run, the seed, the device
and the records written at the end are the same in every mode.

    finished_run(cfg, ctx, say)   --resume of a finished run: its results, nothing retrained
    prepare_model(cfg, ctx)       seeded, prepared (model + fresh adapter + tokenizer), chat template, device
    evaluate_and_save(...)        after fit: held-out metrics through the model's engine, the adapter saved
    results_of(...)               results.json's dict
    write_records(...)            rank 0, after the adapter is saved: the run's files, then the checkpoints go
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..atomic import write_text
from . import checkpoint, distributed, tracking
from .config import TrainConfig

Say = Callable[[str], None]


def sayer(stream: TextIO, ctx: distributed.Context) -> Say:
    """A line printer to `stream` on rank 0; silent on the other ranks."""
    return functools.partial(_say, stream) if ctx.is_main else (lambda *a: None)


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the adapter's init and dropout draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def finished_run(cfg: TrainConfig, ctx: distributed.Context, say: Say) -> dict[str, Any] | None:
    """results.json's dict when `--resume` names a run that already finished (then nothing is to be done;
    a checkpoint a kill after results.json left is removed), else None.

    Raises:
        ValueError: `--output` exists and is not a directory.
    """
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output {output} exists and is not a directory; expected a directory (or a new path)"
        )
    done = checkpoint.finished(output, cfg.to_dict()) if cfg.resume else None
    if done is None:
        return None
    if ctx.is_main:
        checkpoint.remove(output)
    say(
        f"--resume: the run in {output} already finished ({done.get('steps')} steps, results.json); nothing to do"
    )
    return done


def prepare_model(cfg: TrainConfig, ctx: distributed.Context, say: Say):
    """`prepare.prepare(cfg)` after seeding, with `--chat-template` applied and the model on the run's device
    (a quantized base stays where bitsandbytes put it); its notes are said. Returns the `Prepared`."""
    from lorakit.models import is_quantized

    from .prepare import prepare, use_chat_template

    seed_all(cfg.seed)
    prepared = prepare(cfg)
    use_chat_template(prepared, cfg.chat_template)
    if not is_quantized(prepared.model):
        prepared.model.to(ctx.device)
    for note in prepared.notes:
        say(note)
    return prepared


def evaluate_and_save(
    model, prepared, cfg: TrainConfig, ctx: distributed.Context, evaluate=None
) -> dict | None:
    """After `fit` (which put the model under its engine): `evaluate(model)`'s held-out metrics, on rank 0, or
    on every rank under FSDP, whose forwards need them all (None without `evaluate` or off rank 0); then the
    adapter saved by rank 0 from its full tensors (FSDP gathers them on every rank)."""
    from .prepare import save_prepared

    engine, after = distributed.engine_of(model), None
    if evaluate is not None and (ctx.is_main or engine.sharded):
        with engine.evaluating() as m:
            after = evaluate(m)
    with engine.gathered_trainable():
        if ctx.is_main:
            save_prepared(prepared, Path(cfg.output))
    return after


def results_of(cfg: TrainConfig, counts, fitted, before: dict | None, after: dict | None, **extra) -> dict:
    """results.json's dict: before / after metrics, parameter counts, the fit's figures, `extra`, the config."""
    return {
        "before": before,
        "after": after,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "steps": fitted.steps,
        "train_seconds": round(fitted.seconds, 3),
        "tokens_per_second": round(fitted.tokens_per_second, 1),
        **extra,
        "config": cfg.to_dict(),
    }


def write_records(cfg: TrainConfig, results: dict[str, Any], say: Say, train=None) -> None:
    """Rank 0, after the adapter is saved: system_prompt.txt (when `train`, an SFT Dataset, gives one),
    train_config.yaml, results.json (which marks the run finished), the trackers' finals and loss.png; then
    the checkpoints go."""
    from .metrics import plot_loss

    output = Path(cfg.output)
    if train is not None:
        _save_system_prompt(train, output)
    replace(cfg, resume=False, overwrite=False).save(output / "train_config.yaml")
    write_json(output / "results.json", results)
    tracking.finish(results)
    plot_loss(output / "metrics.jsonl", output / "loss.png", before=(results["before"] or {}).get("loss"))
    checkpoint.remove(output)
    say(f"saved the adapter, train_config.yaml, results.json, metrics.jsonl and loss.png in {output}")


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, written atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def _save_system_prompt(train, output: Path) -> None:
    """`system_prompt.txt` beside the adapter when every training row shares one (generate uses it)."""
    from .run_defaults import SYSTEM_NAME, common_system

    system = common_system(train.rows, train.format)
    if system is not None:
        write_text(output / SYSTEM_NAME, system)
    else:
        (output / SYSTEM_NAME).unlink(missing_ok=True)  # an overwritten run's prompt is not this run's
