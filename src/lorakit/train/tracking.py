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

`--resume` continues the same tracker runs: each run's id is saved in OUTPUT/trackers.json (atomically) when
it starts; a resumed session reopens them (MLflow: the same run id, RUNNING again; wandb: the same id,
resume="allow", a second offline-run directory that `wandb sync` appends; trackio: the same name,
resume="allow"; TensorBoard: the same log dir, purge_step past what was logged) and sends only the records
after the last step the trackers already got (metrics.jsonl's last step before the resume: the steps a killed
session logged past its checkpoint are recomputed, equal, and not sent twice), so each tracker holds one run
with increasing steps. The config is sent once, by the first session.

How it hooks into the loop: `start(cfg, output)` before `fit` makes the trackers current; `MetricsLog.write`
forwards each record to `forward`; `finish(results)` after the final evaluation closes them.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig

_current: list[Tracker] = []
_after = {"step": -1}  # a resumed session sends only records after this step (the trackers have the rest)
STATE_NAME = "trackers.json"  # {tracker name: what reopens its run}, written when the trackers start


class Tracker:
    """One backend: `log(record, step)` numbers at a step; `finish(summary)` the final numbers, then close.

    Constructed as `Backend(output, config, resumed, after)`: `resumed` is what `ref()` returned in the
    session being resumed (None: a new run), `after` the last step that run already holds (-1: none).
    """

    name = ""

    def ref(self) -> dict[str, Any]:
        """What reopens this run in a resumed session (saved in OUTPUT/trackers.json)."""
        return {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, float]) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, output: Path, config: dict[str, Any], resumed=None, after: int = -1):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop what earlier event files hold at steps >= it (none, unless a kill came
        # between a tracker's write and metrics.jsonl's), so the log dir reads as one run.
        purge = after + 1 if resumed is not None and after >= 0 else None
        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=purge)
        if resumed is None:
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

    def __init__(self, output: Path, config: dict[str, Any], resumed=None, after: int = -1):
        # MLflow >= 3.8 refuses the file store unless asked (it is in maintenance mode, not removed); it needs
        # no database and no server, which is what an offline run wants.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = (output / "mlruns").absolute().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._reopen((resumed or {}).get("run_id"))
        if self.run_id is not None:
            return  # params were logged by the first session (MLflow refuses to change them)
        exp = self.client.get_experiment_by_name("lorakit")
        exp_id = exp.experiment_id if exp else self.client.create_experiment("lorakit")
        self.run_id = self.client.create_run(exp_id, run_name=output.name).info.run_id
        for k, v in config.items():
            self.client.log_param(self.run_id, k, "" if v is None else str(v)[:500])

    def _reopen(self, run_id: str | None) -> str | None:
        """The saved run marked RUNNING again, or None when there is none (or its store was removed)."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return None
        return run_id

    def ref(self):
        return {"run_id": self.run_id}

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v, step=step)

    def finish(self, summary):
        for k, v in summary.items():
            self.client.log_metric(self.run_id, f"final/{k}", v)
        self.client.set_terminated(self.run_id)


class Wandb(Tracker):
    name = "wandb"

    def __init__(self, output: Path, config: dict[str, Any], resumed=None, after: int = -1):
        import wandb

        (output / "wandb").mkdir(parents=True, exist_ok=True)
        run_id = (resumed or {}).get("run_id")
        self.run = wandb.init(
            mode="offline", dir=str(output), project="lorakit", name=output.name,
            config=None if run_id else config, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip

    def ref(self):
        return {"run_id": self.run.id}

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self, summary):
        for k, v in summary.items():
            self.run.summary[f"final/{k}"] = v
        self.run.finish()


class Trackio(Tracker):
    name = "trackio"

    def __init__(self, output: Path, config: dict[str, Any], resumed=None, after: int = -1):
        _point_trackio_at(output / "trackio")
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project="lorakit",
            name=output.name,
            config=None if resumed is not None else config,
            resume="allow" if resumed is not None else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, metrics, step):
        self.trackio.log(metrics, step=step)

    def finish(self, summary):
        self.trackio.log({f"final/{k}": v for k, v in summary.items()})
        self.trackio.finish()


def _point_trackio_at(path: Path) -> None:
    """Make trackio store in `path`. It reads TRACKIO_DIR from the environment when it is imported and its
    modules bind the directories by name (trackio 0.43), so a second run in one process (a sweep, the tests)
    rebinds them in every trackio module already loaded; otherwise it would write into the first run's dir."""
    import sys

    path = path.absolute()
    os.environ["TRACKIO_DIR"] = str(path)
    dirs = {"TRACKIO_DIR": path, "MEDIA_DIR": path / "media", "ARTIFACTS_DIR": path / "artifacts"}
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "trackio" or name.startswith("trackio.")):
            for attr, value in dirs.items():
                if isinstance(getattr(module, attr, None), Path):
                    setattr(module, attr, value)


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
    saved = _saved_state(output) if cfg.resume else {}
    _after["step"] = _logged_upto(output) if saved else -1
    for name in cfg.trackers():
        try:
            _current.append(BACKENDS[name](output, config, saved.get(name), _after["step"]))
        except ImportError as err:
            finish(None)
            raise ImportError(
                f"--report-to {name} needs the {PACKAGES[name]} package: pip install 'lorakit[track]' ({err})"
            ) from err
    if _current:
        from ..atomic import write_text

        write_text(output / STATE_NAME, json.dumps({t.name: t.ref() for t in _current}, indent=1) + "\n")
    elif not cfg.resume:
        (output / STATE_NAME).unlink(missing_ok=True)  # an overwritten run's trackers are not this run's
    return list(_current)


def _saved_state(output: Path) -> dict[str, Any]:
    """OUTPUT/trackers.json of the session being resumed ({} when none or unreadable: new tracker runs)."""
    try:
        data = json.loads((output / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _logged_upto(output: Path) -> int:
    """The last step metrics.jsonl holds (read before the resumed loop drops the steps past its checkpoint):
    every record goes to metrics.jsonl, then to the trackers, so they hold the steps up to it."""
    from .metrics import read

    return max((int(r.get("step", 0)) for r in read(output / "metrics.jsonl")), default=-1)


def forward(record: dict[str, Any]) -> None:
    """Send one metrics.jsonl record to the current trackers (its numbers, at its "step")."""
    if not _current:
        return
    step = int(record.get("step", 0))
    if step <= _after["step"]:
        return  # a resumed session: the trackers' runs already hold this step
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
