"""Experiment tracking (`--report-to tensorboard,mlflow,wandb,trackio`), every backend offline.

What each tracker gets: every record metrics.jsonl gets, at its step (train records: loss, lr, grad_norm,
tokens, tokens_per_second, elapsed; eval records: eval_loss, eval_perplexity), the resolved TrainConfig at
the start, and the held-out metrics before / after training at the end (`before/loss`, `after/exact_match`,
...), plus steps, train_seconds and tokens_per_second. Where each writes, inside the run's `--output`:

    tensorboard  OUTPUT/tensorboard/       event files (torch.utils.tensorboard; `tensorboard --logdir`)
    mlflow       OUTPUT/mlruns/            MLflow's local file store (`mlflow ui --backend-store-uri ...`)
    wandb        OUTPUT/wandb/             offline run files (mode="offline"; `wandb sync` uploads them)
    trackio      OUTPUT/trackio/           trackio's local SQLite store (TRACKIO_DIR; `trackio show`)

The packages are optional (`pip install 'lorakit[track]'`) and imported only when asked for. A tracker that
fails to start is an error before training (not a silent gap in the records).

How it hooks into the loop: `start(cfg, output)` before `fit` makes the trackers current; `MetricsLog.write`
forwards each record to `forward`; `finish(results)` after the final evaluation closes them.
"""

from __future__ import annotations

import atexit
import math
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig

_current: list[Tracker] = []


class Tracker:
    """One backend: `log(record, step)` numbers at a step; `finish(summary)` the final numbers, then close."""

    name = ""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, float]) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, output: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))
        self.writer.add_text("config", _yaml(config))
        self.config = config

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, summary):
        for k, v in summary.items():
            self.writer.add_scalar(f"final/{k}", v, 0)
        self.writer.close()


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, output: Path, config: dict[str, Any]):
        # MLflow >= 3.8 refuses the file store unless asked (it is in maintenance mode, not removed); it needs
        # no database and no server, which is what an offline run wants.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = (output / "mlruns").absolute().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name("lorakit")
        exp_id = exp.experiment_id if exp else self.client.create_experiment("lorakit")
        self.run_id = self.client.create_run(exp_id, run_name=output.name).info.run_id
        for k, v in config.items():
            self.client.log_param(self.run_id, k, "" if v is None else str(v)[:500])

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v, step=step)

    def finish(self, summary):
        for k, v in summary.items():
            self.client.log_metric(self.run_id, f"final/{k}", v)
        self.client.set_terminated(self.run_id)


class Wandb(Tracker):
    name = "wandb"

    def __init__(self, output: Path, config: dict[str, Any]):
        import wandb

        (output / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode="offline", dir=str(output), project="lorakit", name=output.name, config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self, summary):
        for k, v in summary.items():
            self.run.summary[f"final/{k}"] = v
        self.run.finish()


class Trackio(Tracker):
    name = "trackio"

    def __init__(self, output: Path, config: dict[str, Any]):
        # trackio reads its storage directory from the environment when it is imported.
        os.environ["TRACKIO_DIR"] = str((output / "trackio").absolute())
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project="lorakit",
            name=output.name,
            config=config,
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, metrics, step):
        self.trackio.log(metrics, step=step)

    def finish(self, summary):
        self.trackio.log({f"final/{k}": v for k, v in summary.items()})
        self.trackio.finish()


BACKENDS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb, "trackio": Trackio
}  # fmt: skip
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


def start(cfg: TrainConfig, output: str | os.PathLike) -> list[Tracker]:
    """Open the trackers `cfg.report_to` names and make them current (replacing any still open).

    Raises:
        ImportError: a tracker's package is missing (naming the pip command).
    """
    finish(None)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict()
    for name in cfg.trackers():
        try:
            _current.append(BACKENDS[name](output, config))
        except ImportError as err:
            finish(None)
            raise ImportError(
                f"--report-to {name} needs the {PACKAGES[name]} package: pip install 'lorakit[track]' ({err})"
            ) from err
    return list(_current)


def forward(record: dict[str, Any]) -> None:
    """Send one metrics.jsonl record to the current trackers (its numbers, at its "step")."""
    if not _current:
        return
    step = int(record.get("step", 0))
    metrics = {k: float(v) for k, v in record.items() if k != "step" and _number(v)}
    for tracker in _current:
        tracker.log(metrics, step)


def finish(results: dict[str, Any] | None) -> None:
    """Log the final numbers of `results` (results.json's dict; None: none) and close the current trackers."""
    summary = summary_of(results) if results else {}
    while _current:
        _current.pop(0).finish(summary)


def summary_of(results: dict[str, Any]) -> dict[str, float]:
    """The final numbers of a run: before/<metric>, after/<metric>, steps, train_seconds, tokens_per_second."""
    out: dict[str, float] = {}
    for when in ("before", "after"):
        for k, v in (results.get(when) or {}).items():
            if _number(v):
                out[f"{when}/{k}"] = float(v)
    for k in ("steps", "train_seconds", "tokens_per_second", "trainable_params"):
        if _number(results.get(k)):
            out[k] = float(results[k])
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    ")  # markdown code block


atexit.register(finish, None)  # a run that raised still closes its trackers (wandb / mlflow mark it ended)
