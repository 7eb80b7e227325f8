"""benchmarks/bench_train_1b.py (issue 11's GPU measurement, run where a GPU is lent) keeps working: a smoke run on
CPU at one layer, eager configurations only; the table's ratios are those of the recorded step times."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_1b_smoke(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_1b.py"), "--device", "cpu", "--dtype", "fp32",
           "--threads", "1", "--layers", "1", "--vocab", "49152", "--seq", "16", "--steps", "2",
           "--configs", "base", "lorakit", "peft", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    steps = {n: r["step_s"] for n, r in res["results"].items()}
    assert list(steps) == ["base", "lorakit", "peft"] and all(
        len(t) == 2 and min(t) > 0 for t in steps.values()
    )
    ratio = statistics.median(a / b for a, b in zip(steps["lorakit"], steps["peft"]))
    row = next(line for line in res["table"].splitlines() if line.startswith("lorakit "))
    assert abs(float(row.split()[3]) - ratio) < 1e-3  # "/ PEFT" column
