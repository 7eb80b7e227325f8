"""loss.png: the raw and smoothed training loss, and the held-out loss from before training on."""

from __future__ import annotations

import json

import pytest

from lorakit.train.metrics import plot_loss, smooth


def test_smooth_is_the_debiased_ema():
    values = [4.0, 2.0, 3.0, 1.0, 0.5]
    w = 0.9
    for k in range(1, len(values) + 1):
        num = sum((1 - w) * w ** (k - j) * values[j - 1] for j in range(1, k + 1))
        assert smooth(values, w)[k - 1] == pytest.approx(num / (1 - w**k))
    assert smooth([2.5] * 7) == pytest.approx([2.5] * 7)  # no warm-up bias
    assert smooth(values)[0] == values[0]


def test_plot_takes_the_before_training_point(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    assert plot_loss(empty, tmp_path / "none.png") is None
    assert plot_loss(empty, tmp_path / "before.png", before=1.5) == tmp_path / "before.png"
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 9)] + [{"step": 8, "eval_loss": 0.4}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png", before=2.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
