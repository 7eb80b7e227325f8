"""GRPO demo: the default model (SmolLM2-135M-Instruct) learns to answer "What is A + B?" within a few tokens.

    python benchmarks/grpo_demo.py [--steps 20] [--output runs/grpo_demo]

Runs `lorakit train --mode grpo --reward exact` on the shipped task (src/lorakit/data/grpo_demo, made by
scripts/make_grpo_demo_data.py): rollouts sampled by lorakit's serving engine from the live adapter, the exact
match of the extracted final answer against "answer" as the reward. Prints the held-out (32 prompts never
trained on) mean reward and exact match of greedy completions before / after, the time, and the machine load
(`uptime`) before and after, and writes them to benchmarks/results/grpo_demo_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "lorakit" / "data" / "grpo_demo"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default="runs/grpo_demo")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "grpo_demo_cpu.json"))
    args, extra = p.parse_known_args()
    flags = [
        "train", "--mode", "grpo", "--reward", "exact", "--data", str(DATA / "train.jsonl"),
        "--eval-data", str(DATA / "eval.jsonl"), "--output", args.output, "--overwrite",
        "--steps", str(args.steps), "--batch-size", "4", "--num-generations", "8", "--max-new-tokens", "12",
        "--temperature", "1.0", "--beta", "0", "--lr", "5e-4", "--warmup", "0", "--rank", "16",
        "--max-len", "128", "--log-every", "1", *extra,
    ]  # fmt: skip
    load_before = _uptime()
    t0 = time.perf_counter()
    from lorakit.cli import main as cli

    code = cli(flags)
    seconds = time.perf_counter() - t0
    if code != 0:
        return code
    results = json.loads((Path(args.output) / "results.json").read_text())
    before, after = results["before"], results["after"]
    load_after = _uptime()
    print(f"\nheld-out ({after['n']} prompts, greedy, {args.steps} steps)   before    after")
    for key in ("reward", "exact_match", "completion_length"):
        print(f"  {key:<36} {before[key]:>7.3f} {after[key]:>8.3f}")
    print(
        f"wall {seconds:.0f} s (train {results['train_seconds']:.0f} s); load before: {load_before}; after: {load_after}"
    )
    record = {
        "command": "python benchmarks/grpo_demo.py " + " ".join(sys.argv[1:]), "flags": flags,
        "before": {k: before[k] for k in ("reward", "exact_match", "completion_length")},
        "after": {k: after[k] for k in ("reward", "exact_match", "completion_length")},
        "samples_after": after["samples"], "wall_seconds": round(seconds, 1),
        "train_seconds": results["train_seconds"], "uptime_before": load_before, "uptime_after": load_after,
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
