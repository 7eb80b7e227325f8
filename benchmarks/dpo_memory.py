"""Peak memory of DPO with LoRA: lorakit (`--mode dpo`) against TRL's DPOTrainer + PEFT, same data, one run.

Each side runs in its own subprocess: load the default model (SmolLM2-135M-Instruct, fp32), add a LoRA adapter
(r = 16, alpha = 32, all linear layers but the head, no dropout), train `--steps` DPO steps of `--batch` pairs
(sigmoid loss, beta 0.1, lr 1e-4, reference = the adapter disabled, no gradient checkpointing, no precompute) on
the shipped DPO demo pairs (src/lorakit/data/dpo_demo/train.jsonl). Reported: the process's peak RSS, the RSS after
the first step (model, adapter, tokenized data), the peak RSS during training (VmHWM reset after setup), their
difference (what training adds), and seconds per step. With `--device cuda`, CUDA peak
allocated memory is reported too.

    python benchmarks/dpo_memory.py --steps 4 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "lorakit" / "data" / "dpo_demo" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    """The resident-set high-water mark (VmHWM) since the last `_reset_peak()`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5), so the peak is that of training alone, not of
    loading the model (reading and converting the checkpoint peaks higher than training a small batch)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_lorakit(a) -> dict:
    import torch

    import lorakit
    from lorakit.data.preference import load_preference
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, loop

    model, tok = load_model("default", device=a.device)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, targets=TARGETS))
    ds = load_preference(DATA, tok, "dpo", max_len=128)
    cfg = TrainConfig(
        mode="dpo",
        output=a.out,
        steps=a.steps,
        batch_size=a.batch,
        lr=1e-4,
        warmup=0.0,
        beta=0.1,
        log_every=1,
    )
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = _rss_mib()  # the model, the adapter and the tokenized data, before the first step
    _reset_peak()
    t0 = time.perf_counter()
    loop.fit(model, ds.examples, cfg, pad_id=tok.pad_token_id)
    return _result(a, loaded, time.perf_counter() - t0)


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lorakit.models import load_model

    model, tok = load_model("default", device=a.device)
    rows = []
    for line in DATA.read_text().splitlines():
        r = json.loads(line)
        rows.append(
            {"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        )  # fmt: skip
    args = DPOConfig(
        output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-4,
        warmup_steps=0, beta=0.1, loss_type=["sigmoid"], report_to=[], use_cpu=a.device == "cpu",
        save_strategy="no", logging_steps=1, max_length=None, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config,
    )
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = _rss_mib()  # the model, the adapter and the tokenized data, before the first step
    _reset_peak()
    t0 = time.perf_counter()
    trainer.train()
    return _result(a, loaded, time.perf_counter() - t0)


def _result(a, loaded: float, seconds: float) -> dict:
    out = {"peak_rss_mib": round(_peak_mib(), 1), "rss_before_training_mib": round(loaded, 1),
           "s_per_step": round(seconds / a.steps, 2)}  # fmt: skip
    out["training_adds_mib"] = round(out["peak_rss_mib"] - loaded, 1)
    if a.device == "cuda":
        import torch

        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=["lorakit", "trl"], help=argparse.SUPPRESS)  # one subprocess's side
    p.add_argument("--out", default="runs/bench_dpo")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    if a.side:
        result = (run_lorakit if a.side == "lorakit" else run_trl)(a)
        print("RESULT " + json.dumps(result))
        return 0
    results = {}
    for side in ("lorakit", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--batch", str(a.batch),
               "--device", a.device, "--out", f"{a.out}/{side}"]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{side} failed (exit {proc.returncode})")
        results[side] = json.loads(line[0][7:])
    keys = list(results["lorakit"])
    print(
        f"DPO, {a.steps} steps of {a.batch} pairs, SmolLM2-135M fp32, LoRA r=16 on {a.device}; load: {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':24}{'lorakit':>12}{'TRL + PEFT':>14}")
    for k in keys:
        print(f"{k:<24}{results['lorakit'][k]:>12}{results['trl'][k]:>14}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
