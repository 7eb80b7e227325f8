"""`--report-to`: every tracker gets metrics.jsonl's records, the resolved config and the final metrics,
offline; checked by reading back what each one wrote with its own reader."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import math
import sqlite3
from pathlib import Path

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lorakit.train import TrainConfig, metrics, run
from lorakit.train.tracking import summary_of
from test_train_run import write_rows

TRACKERS = [t for t in ("tensorboard", "mlflow", "wandb", "trackio") if importlib.util.find_spec(t)]


def usable_trackers() -> list[str]:
    """The installed trackers that import: trackio 0.43 pins pillow < 13 and may be installed against a newer
    one (it is not in the test extra for that reason); its tests then skip instead of failing every tracker."""
    usable = []
    for name in TRACKERS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure means: not usable here
            continue
        usable.append(name)
    return usable


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """(output dir, metrics.jsonl records, results) of one tiny run reporting to every installed tracker."""
    tmp = tmp_path_factory.mktemp("tracked")
    tiny_llama().save_pretrained(tmp / "base")
    tiny_tokenizer().save_pretrained(tmp / "base")
    cfg = TrainConfig(
        model=str(tmp / "base"), data=str(write_rows(tmp / "t.jsonl", 16, 0)),
        eval_data=str(write_rows(tmp / "e.jsonl", 4, 1)), output=str(tmp / "out"), rank=2, steps=4,
        batch_size=4, lr=1e-2, eval_every=2, log_every=1, report_to=",".join(usable_trackers()),
    )  # fmt: skip
    results = run(cfg)
    return tmp / "out", metrics.read(tmp / "out" / "metrics.jsonl"), results, cfg


def _expected(records):
    """{(step, key): value} of every number in metrics.jsonl."""
    return {(r["step"], k): float(v) for r in records for k, v in r.items() if k != "step"}


def _assert_same(got: dict, records, summary: dict, final_prefix="final/"):
    want = _expected(records)
    assert want and {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)
    finals = {k[len(final_prefix) :]: v for (_, k), v in got.items() if k.startswith(final_prefix)}
    assert finals == pytest.approx(summary) and "after/loss" in finals and "before/exact_match" in finals


@pytest.mark.skipif("tensorboard" not in TRACKERS, reason="tensorboard not installed")
def test_tensorboard_event_files(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records, results, cfg = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    _assert_same(got, records, summary_of(results))
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"lr: {cfg.lr}" in text and "report_to: " in text


@pytest.mark.skipif("mlflow" not in TRACKERS, reason="mlflow not installed")
def test_mlflow_file_store(tracked_run):
    from mlflow.tracking import MlflowClient

    out, records, results, cfg = tracked_run
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run_info,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    got = {}
    for key in run_info.data.metrics:
        for m in client.get_metric_history(run_info.info.run_id, key):
            got[(m.step, key)] = m.value
    _assert_same(got, records, summary_of(results))
    assert run_info.data.params["lr"] == str(cfg.lr) and run_info.data.params["rank"] == "2"
    assert run_info.info.status == "FINISHED"


def _wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks
    (crc32 4 bytes, length 2, type 1: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = Path(path).read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


@pytest.mark.skipif("wandb" not in TRACKERS, reason="wandb not installed")
def test_wandb_offline_run_files(tracked_run):
    out, records, results, cfg = tracked_run
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    got, config = {}, {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item
            }
            for k, v in items.items():
                if not k.startswith("_"):
                    got[(items["_step"], k)] = v
        elif kind == "summary":
            for u in r.summary.update:
                if u.key.startswith("final/"):
                    got[(None, u.key)] = json.loads(u.value_json)
        elif kind in ("run", "config"):
            cfg_updates = r.run.config.update if kind == "run" else r.config.update
            config.update({u.key: json.loads(u.value_json) for u in cfg_updates})
    _assert_same(got, records, summary_of(results))
    assert config["lr"] == cfg.lr and config["steps"] == 4


def test_trackio_local_store(tracked_run):
    out, records, results, cfg = tracked_run
    if "trackio" not in cfg.trackers():
        pytest.skip("trackio not installed or not importable here (it pins pillow < 13)")
    db = sqlite3.connect(out / "trackio" / "lorakit.db")
    got = {}
    for step, blob in db.execute("select step, metrics from metrics"):
        for k, v in json.loads(blob).items():
            if isinstance(v, int | float) and math.isfinite(v):
                got[(step, k)] = v
    _assert_same(got, records, summary_of(results))
    (config,) = [json.loads(c) for (c,) in db.execute("select config from configs")]
    assert config["lr"] == cfg.lr and config["report_to"] == cfg.report_to


def test_no_tracker_packages_imported_without_report_to(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\nfrom lorakit.train import tracking\nfrom lorakit.train.config import TrainConfig\n"
        f"tracking.start(TrainConfig(output={str(tmp_path)!r}), {str(tmp_path)!r})\n"
        "tracking.forward({'step': 1, 'loss': 1.0}); tracking.finish({})\n"
        "print(sorted(m for m in ('tensorboard', 'mlflow', 'wandb', 'trackio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match=r"--report-to='tensorboard,comet' is invalid.*unknown: \['comet'\]"):
        TrainConfig(report_to="tensorboard,comet")
