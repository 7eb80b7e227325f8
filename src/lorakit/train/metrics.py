"""What a run reports while it trains: metrics.jsonl, a progress line on stderr, and loss.png.

- `MetricsLog` appends one JSON record per logged step ({"step", "loss", "lr", ...}) or evaluation
  ({"step", "eval_loss", ...}) and flushes it, so the file is current even after `kill -9`.
- `Progress` rewrites one stderr line in place on a terminal (loss, tokens/s, ETA); elsewhere (CI, a log
  file) it prints one line every `every` steps instead.
- `plot_loss` draws the training loss (and evaluation loss) against the step with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..atomic import save_figure, write_text
from . import tracking


class MetricsLog:
    """Appends JSON records to `path`. On resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            # The killed run may have logged steps past its last checkpoint; they will be run again.
            kept = [r for r in read(self.path) if r.get("step", 0) <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.forward(record)  # the same record to --report-to trackers (none: a no-op)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line, from a kill mid-write, is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Progress:
    """Progress of `total` optimizer steps: `update` after each step; `close` ends the line."""

    def __init__(self, total: int, start: int = 0, every: int = 10, stream: TextIO | None = None):
        self.total, self.start, self.every = total, start, max(1, every)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.open_line = False

    def update(self, step: int, loss: float, lr: float, tokens: int, extra: dict | None = None) -> None:
        """`step`: optimizer steps done; `tokens`: tokens processed by this step; `extra`: more metrics to show
        (preference modes: reward accuracy and margin)."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else 0.0
        shown = "".join(f"  {_SHORT[k]} {v:.3f}" for k, v in (extra or {}).items() if k in _SHORT)
        line = (
            f"step {step}/{self.total}  loss {loss:.4f}{shown}  lr {lr:.2e}  {tps:,.0f} tok/s  "
            f"ETA {_duration(eta)}"
        )
        if self.tty:
            width = 30
            filled = int(width * step / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}\x1b[K")
            self.open_line = True
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an evaluation, a checkpoint), keeping the progress line intact."""
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


# Metrics of the preference modes shown on the progress line, by their short names.
_SHORT = {"reward_accuracy": "acc", "reward_margin": "margin", "kl": "kl"}
_SHORT.update(reward="reward", exact_match="exact", completion_length="len")  # grpo
_SHORT.update(clip_ratio_region="clip")  # grpo with --grpo-iterations > 1


class RowProgress:
    """`label: done/total rows  ETA m:ss`, rewritten in place on a terminal; elsewhere a line at each tenth."""

    def __init__(self, total: int, label: str, stream: TextIO):
        self.total, self.label, self.stream = total, label, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self.shown = 0  # tenths already printed (not a terminal)

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = f"{self.label}: {done}/{self.total} rows  {elapsed:.0f} s  ETA {_duration(eta)}"
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        elif done * 10 // max(1, self.total) > self.shown or done == self.total:
            self.shown = done * 10 // max(1, self.total)
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal (the caller's next line starts clean)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with `weight` on the past, debiased (divided by
    1 - weight^k after k values) so the curve starts at the first value instead of rising from 0."""
    out, ema = [], 0.0
    for k, v in enumerate(values, 1):
        ema = weight * ema + (1 - weight) * v
        out.append(ema / (1 - weight**k))
    return out


def plot_loss(
    metrics_path: str | os.PathLike, png_path: str | os.PathLike, before: float | None = None
) -> Path | None:
    """Draw loss against step from metrics.jsonl into `png_path` (atomically); None when nothing to draw.

    The raw training loss is drawn faint with its smoothed curve (`smooth`) over it; evaluation losses as
    points, starting with `before` (the held-out loss before training) at step 0 when given. Preference
    runs add a panel per metric group (`preference_series`): reward accuracy, margin, answer log-probs, KTO's z0.
    """
    records = read(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and _finite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and _finite(r["eval_loss"])]
    if before is not None and _finite(before):
        evals.insert(0, (0, before))
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = preference_series(records)
    cols, rows = (2, 1 + len(panels) // 2) if panels else (1, 1)
    fig = Figure(figsize=(5 * cols, 4 * rows), dpi=100)
    ax = fig.add_subplot(rows, cols, 1)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1.0, label="train loss")
        if len(train) > 2:
            ax.plot(
                steps, smooth(list(losses)), color="tab:blue", linewidth=1.8, label="train loss (smoothed)"
            )
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="held-out loss", linewidth=1.2)
        if before is not None and evals[0][0] == 0:
            ax.annotate("before training", evals[0], textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per pair / row)" if panels else "loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    for i, (title, series) in enumerate(panels, 2):  # preference modes: their metrics beside the loss
        axi = fig.add_subplot(rows, cols, i)
        for label, points in series.items():
            axi.plot(*zip(*points), "o-" if label.startswith("held-out") else "-", label=label, linewidth=1.2)
        axi.set_title(title, fontsize=10)
        axi.set_xlabel("optimizer step")
        if "accuracy" in title:
            axi.set_ylim(-0.02, 1.02)
        axi.grid(alpha=0.3)
        axi.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png_path)


# The preference panels of loss.png: (title, [(metrics.jsonl key, legend label)]); train keys per step,
# eval_ keys per evaluation.
_PANELS = (
    ("reward accuracy (chosen reward > rejected)", (("reward_accuracy", "train"),)),
    ("reward margin (chosen - rejected, β·log-ratio)", (("reward_margin", "train"),)),
    ("answer log-probs (summed over answer tokens)",
     (("logps_chosen", "chosen"), ("logps_rejected", "rejected"), ("logps_desirable", "desirable"),
      ("logps_undesirable", "undesirable"))),
    ("KTO reference point z0 (kl)", (("kl", "train"),)),
)  # fmt: skip


def preference_series(records: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """The preference panels of loss.png that have data: (title, {legend label: [(step, value)]}), each key
    drawn for training ("train" / its name) and for held-out evaluations ("held-out ...", from eval_<key>)."""
    out = []
    for title, keys in _PANELS:
        series = {}
        for key, label in keys:
            held_out = "held-out" if label == "train" else f"held-out {label}"
            for k, name in ((key, label), (f"eval_{key}", held_out)):
                points = [(r["step"], r[k]) for r in records if _finite(r.get(k))]
                if points:
                    series[name] = points
        if series:
            out.append((title, series))
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
