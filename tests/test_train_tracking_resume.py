"""`--resume` with `--report-to`: each tracker continues the same run (one run, increasing steps, no step
twice), read back with each tracker's own reader. The first session dies after logging step 3 with its last
checkpoint at step 2 (what `kill -9` leaves: steps logged past the checkpoint), the second resumes."""

from __future__ import annotations

import dataclasses
import glob
import json
import sqlite3

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lorakit.train import TrainConfig, loop, metrics, run
from test_train_run import write_rows
from test_train_tracking import _wandb_records, usable_trackers

STEPS = 6


class Killed(RuntimeError):
    """Stands for the process dying: not Ctrl-C, so the loop saves no checkpoint on the way out."""


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """(output dir, metrics.jsonl records, trackers used) of a run killed during step 4 and resumed."""
    tmp = tmp_path_factory.mktemp("resumed")
    tiny_llama().save_pretrained(tmp / "base")
    tiny_tokenizer().save_pretrained(tmp / "base")
    trackers = usable_trackers()
    if not trackers:
        pytest.skip("no tracker package installed")
    cfg = TrainConfig(
        model=str(tmp / "base"), data=str(write_rows(tmp / "t.jsonl", 16, 0)), output=str(tmp / "out"),
        eval_data=str(write_rows(tmp / "e.jsonl", 4, 1)), rank=2, steps=STEPS, batch_size=4, lr=1e-2,
        eval_every=2, log_every=1, save_every=2, report_to=",".join(trackers),
    )  # fmt: skip
    plain = loop.set_lr

    def dies_in_step_4(optimizer, cfg, step, total, warmup):
        if step == 3:
            raise Killed
        return plain(optimizer, cfg, step, total, warmup)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "set_lr", dies_in_step_4)
        with pytest.raises(Killed):
            run(cfg)
    first = metrics.read(tmp / "out" / "metrics.jsonl")
    assert max(r["step"] for r in first) == 3  # logged past the checkpoint at step 2
    run(dataclasses.replace(cfg, resume=True))
    records = metrics.read(tmp / "out" / "metrics.jsonl")
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1))
    return tmp / "out", records, trackers


TIMING = ("elapsed", "tokens_per_second")


def _check(got: dict[str, list[tuple[int, float]]], records):
    """Every key's steps strictly increase (none twice) and its values are metrics.jsonl's.

    Step 3 ran twice (killed, then recomputed from the step-2 checkpoint): the trackers keep what the killed
    session sent, metrics.jsonl the rerun; the same loss, lr, grad norm and tokens, another timing (not
    compared at step 3)."""
    want: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float):
                want.setdefault(k, []).append((r["step"], float(v)))
    assert want.keys() <= got.keys()
    for k, points in want.items():
        steps = [s for s, _ in got[k]]
        assert steps == sorted(set(steps)), (k, steps)
        assert steps == [s for s, _ in points], k
        same = [(a, b) for (s, a), (_, b) in zip(got[k], points, strict=True) if not (k in TIMING and s == 3)]
        assert [a for a, _ in same] == pytest.approx([b for _, b in same], rel=1e-5), k


def test_tensorboard_one_log_dir_without_repeated_steps(resumed_run):
    out, records, trackers = resumed_run
    if "tensorboard" not in trackers:
        pytest.skip("tensorboard not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 2  # one file a session
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    _check(got, records)
    assert len(acc.Tensors("config/text_summary")) == 1  # the config once, from the first session


def test_mlflow_resumes_the_same_run_id(resumed_run):
    out, records, trackers = resumed_run
    if "mlflow" not in trackers:
        pytest.skip("mlflow not installed")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (info,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert info.info.run_id == json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    got = {
        k: [(m.step, m.value) for m in client.get_metric_history(info.info.run_id, k)]
        for k in info.data.metrics
    }
    _check(got, records)
    assert info.info.status == "FINISHED" and info.data.params["resume"] == "False"


def test_wandb_offline_resumes_the_same_run_id(resumed_run):
    out, records, trackers = resumed_run
    if "wandb" not in trackers:
        pytest.skip("wandb not installed")
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["run_id"]
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # `wandb sync` appends
    sessions = []
    for path in files:
        history = []
        for r in _wandb_records(path):
            if r.WhichOneof("record_type") == "history":
                history.append(
                    {
                        i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
                        for i in r.history.item
                    }
                )
        sessions.append(history)
    # In session order: by the wall time of each file's first record (the directory names' seconds can tie
    # or, across a clock step, mislead).
    sessions.sort(key=lambda h: h[0]["_timestamp"] if h else float("inf"))
    got: dict[str, list] = {}
    for items in (items for history in sessions for items in history):
        for k, v in items.items():
            if not k.startswith("_"):
                got.setdefault(k, []).append((items["_step"], v))
    _check(got, records)


def test_trackio_resumes_the_same_run(resumed_run):
    out, records, trackers = resumed_run
    if "trackio" not in trackers:
        pytest.skip("trackio not installed or not importable here")
    db = sqlite3.connect(out / "trackio" / "lorakit.db")
    assert len({name for (name,) in db.execute("select distinct run_name from metrics")}) == 1
    got: dict[str, list] = {}
    for step, blob in db.execute("select step, metrics from metrics order by id"):
        for k, v in json.loads(blob).items():
            if not k.startswith("final/") and isinstance(v, int | float):
                got.setdefault(k, []).append((step, v))
    _check(got, records)
