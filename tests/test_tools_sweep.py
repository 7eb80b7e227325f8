"""lorakit sweep on a tiny model saved to disk: one real training run per rank (lorakit.train.run)."""

from __future__ import annotations

import json

from conftest import tiny_llama, tiny_tokenizer
from lorakit.cli import main


def test_sweep_two_ranks(tmp_path, capsys):
    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(24)]
    for name, part in (("train.jsonl", rows[:16]), ("eval.jsonl", rows[16:20])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    argv = ["sweep", "--ranks", "4", "2", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"),
            "--eval-data", str(tmp_path / "eval.jsonl"), "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
            "--output", str(tmp_path / "sweep"), "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["metric"] == "exact_match" and [r["rank"] for r in summary["runs"]] == [2, 4]
    for run in summary["runs"]:
        results = json.loads((tmp_path / "sweep" / f"r{run['rank']}" / "results.json").read_text())
        assert run["metric"] == results["after"]["exact_match"]
        assert run["loss"] == results["after"]["loss"]
        assert run["trainable_params"] == results["trainable_params"]
        assert results["config"]["rank"] == run["rank"] and results["config"]["steps"] == 3
        assert results["config"]["seed"] == 3
        # all-linear on 2 layers: (q, k, v, o, gate, up, down) x r x (in + out)
        per_rank = 2 * (32 + 32 + 32 + 16 + 32 + 16 + 32 + 32 + 32 + 64 + 32 + 64 + 64 + 32)
        assert run["trainable_params"] == run["rank"] * per_rank
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "trainable params" in out and f"{4 * per_rank:,}" in out
    # A second call reuses the finished runs (same configs): nothing is trained again.
    mtime = (tmp_path / "sweep" / "r4" / "results.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (tmp_path / "sweep" / "r4" / "results.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    # --rank is refused (the sweep sets it)
    assert main([*argv, "--rank", "8"]) == 1
    assert "--ranks, not --rank" in capsys.readouterr().err
