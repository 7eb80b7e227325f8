"""sweep: train one adapter per rank on the same data, steps and seed; held-out metric and trainable
parameters against rank (sweep.json, a printed table, sweep.png)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..tools.plot import pyplot, save_figure


def sweep(base, ranks: list[int], output: str | os.PathLike, reuse: bool = True) -> dict[str, Any]:
    """Train `base` (a TrainConfig) once per rank into `output/r<rank>/`, via `lorakit.train.run`.

    Everything but the rank (and the output directory) is the same for every run: data, steps, seed,
    learning rate, alpha (None: 2·rank for each, i.e. the same scaling s = 2). With `reuse`, a rank whose
    `results.json` already holds this exact config is not trained again (a long sweep can be resumed).

    The metric is the held-out exact match for chat / prompt data, else the perplexity (see
    `lorakit.train.evaluate`). Writes `output/sweep.json` ({"metric", "runs": [{rank, metric, loss,
    perplexity, exact_match, trainable_params, train_seconds, output}]}) and `output/sweep.png`.

    Returns:
        sweep.json's dict.
    Raises:
        ValueError: no ranks, a rank that is not a positive integer, or runs without held-out metrics
            (give eval_data, or train on the demo which has its own held-out split).
    """
    from lorakit.train import run

    if not ranks or any(not isinstance(r, int) or r <= 0 for r in ranks):
        raise ValueError(f"sweep: --ranks {ranks!r} is invalid: expected positive integers")
    ranks = sorted(set(ranks))
    root = Path(output)
    runs = []
    for r in ranks:
        cfg = replace(base, rank=r, output=str(root / f"r{r}"), resume=False)
        results = _previous(cfg) if reuse else None
        if results is None:
            results = run(cfg)
        after = results.get("after")
        if not after:
            raise ValueError(
                "sweep: the runs have no held-out metrics; give --eval-data (the demo has its own held-out split)"
            )
        runs.append(
            {
                "rank": r,
                "loss": after.get("loss"),
                "perplexity": after.get("perplexity"),
                "exact_match": after.get("exact_match"),
                "trainable_params": results["trainable_params"],
                "train_seconds": results.get("train_seconds"),
                "output": cfg.output,
            }
        )
    metric = "exact_match" if all(x["exact_match"] is not None for x in runs) else "perplexity"
    for x in runs:
        x["metric"] = x[metric]
    summary = {"metric": metric, "steps": base.steps, "seed": base.seed, "runs": runs}
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / "sweep.json", json.dumps(summary, indent=2) + "\n")
    plot_sweep(summary, root / "sweep.png")
    return summary


def _previous(cfg) -> dict | None:
    """results.json of an earlier run of exactly this config, if any."""
    path = Path(cfg.output) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return results if results.get("config") == cfg.to_dict() else None


def format_table(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    lines = [f"{'rank':>5}  {metric:>12}  {'loss':>8}  {'trainable params':>16}  {'train s':>8}"]
    for x in summary["runs"]:
        value = f"{x['metric']:.1%}" if metric == "exact_match" else f"{x['metric']:.3f}"
        secs = f"{x['train_seconds']:.0f}" if x["train_seconds"] is not None else "-"
        lines.append(
            f"{x['rank']:>5}  {value:>12}  {x['loss']:>8.4f}  {x['trainable_params']:>16,}  {secs:>8}"
        )
    return "\n".join(lines)


def plot_sweep(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Held-out metric (left axis) and trainable parameters (right axis, log) against rank (log2)."""
    plt = pyplot()
    runs = summary["runs"]
    ranks = [x["rank"] for x in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    exact = summary["metric"] == "exact_match"
    values = [x["metric"] * 100 if exact else x["metric"] for x in runs]
    ax.plot(ranks, values, "o-", color="tab:blue", lw=2)
    for r, v in zip(ranks, values):
        ax.annotate(f"{v:.1f}" if exact else f"{v:.3g}", (r, v), textcoords="offset points", xytext=(0, 7),
                    ha="center", color="tab:blue", fontsize=8)  # fmt: skip
    if exact:
        ax.set_ylim(0, 105)
    ax.set_ylabel("held-out exact match (%)" if exact else "held-out perplexity", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    twin = ax.twinx()
    twin.plot(ranks, [x["trainable_params"] for x in runs], "s--", color="tab:orange")
    twin.set_yscale("log")
    twin.set_ylabel("trainable parameters", color="tab:orange")
    if 16 in ranks:
        ax.axvline(16, color="gray", ls=":", lw=1)
    steps = f", {summary['steps']} steps" if summary.get("steps") else ""
    ax.set_title(f"rank sweep (same data, seed{steps})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)
