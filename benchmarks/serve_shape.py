"""The decode step alone at a realistic size: `python benchmarks/bench_serve.py --shape llama-1b|smollm2`.

A random-weight model built from a config (SHAPES; no download), 8 random r=--rank all-linear adapters, one
in-process Engine per scenario at batch --concurrency over the same model and slots (base / 1 adapter / 8 mixed,
as many rows each / 8 mixed unevenly, 4-3-2-2-2-1-1-1 rows at batch 16), their decode steps alternating one by
one (a slow phase of a shared machine hits every scenario alike), --repeat rounds of --steps steps each: the
median and 20th-percentile step. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from serve_data import char_tokenizer, random_adapters, scratch_dir

SHAPES = {  # Llama-3.2-1B's shapes (tied embeddings, the full 128256 vocabulary); SmolLM2-135M's
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}  # fmt: skip


def shape_model(shape: str, tmp: Path, n_adapters: int, rank: int):
    """A random-weight model of `shape` (in memory, fp32, eval) and `n_adapters` random adapters saved for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)  # fmt: skip
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    return model, random_adapters(model, tmp, n_adapters, rank)


def interleaved_steps(engines: dict, plans: dict, steps: int, eager: tuple = ()) -> dict[str, list[float]]:
    """The ms of `steps` decode steps of each scenario, sorted. engines[k] (not started: driven here, as the tests
    do) gets one row per entry of plans[k]; once every row is prefilled (and one step more, a warm-up), the
    scenarios take one step each in turn, the order reversed every other turn, so a slow phase of a shared
    machine falls on all of them alike (one scenario after another, rounds moved by ±15 % here). The scenarios
    in `eager` step inside fast.plain_path() (the eager grouped pair instead of the native kernel)."""
    import contextlib

    from lorakit import fast
    from lorakit.serve import Request

    reqs = {}
    for k, adapters in plans.items():
        reqs[k] = [Request([5 + (i * 7 + j) % 90 for j in range(12)], a, steps + 4, temperature=0, ignore_eos=True)
                   for i, a in enumerate(adapters)]  # fmt: skip
        for r in reqs[k]:
            engines[k].submit(r)
    times: dict[str, list[float]] = {k: [] for k in plans}
    with torch.inference_mode():
        for k, engine in engines.items():
            while len(engine._rows) < len(reqs[k]):
                engine._iterate()
            engine._iterate()
        order = list(plans)
        for step in range(steps):
            for k in order if step % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                with fast.plain_path() if k in eager else contextlib.nullcontext():
                    engines[k]._iterate()
                times[k].append(1e3 * (time.perf_counter() - start))
        for k, engine in engines.items():
            for r in reqs[k]:
                engine.cancel(r)
            while engine.running:
                engine._iterate()
    return {k: sorted(v) for k, v in times.items()}


UNEVEN = (0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7)  # adapter per row of the uneven mix (cycled)


def run_shape(args) -> None:
    """The decode-step comparison at `args.shape` (module docstring): prints a table, writes JSON."""
    from lorakit.fast import native
    from lorakit.serve import AdapterRegistry, Engine
    from lorakit.serve.commands import load_native_kernel

    torch.set_num_threads(args.threads)
    tmp = scratch_dir()
    start = time.perf_counter()
    model, dirs = shape_model(args.shape, tmp, 8, args.rank)
    load_native_kernel(args.native_kernel, model)  # as `lorakit serve` does (auto: says why on stderr if not)
    kernel = native.loaded()
    slot_dtype = getattr(torch, args.slot_dtype) if args.slot_dtype else None
    registry = AdapterRegistry(model, "base", max_loaded=8, slot_dtype=slot_dtype)
    for d in dirs:
        registry.add(d.name, d)
    c, names = args.concurrency, [d.name for d in dirs]
    plans = {
        "base model": [None] * c,
        "1 adapter": ["a0"] * c,
        "8 adapters mixed": [names[i % 8] for i in range(c)],
        # 4, 3, 2, 2, 2, 1, 1, 1 rows at batch 16: not in place order, so gathered and padded to 4 places each
        "8 mixed, uneven": [names[UNEVEN[i % len(UNEVEN)]] for i in range(c)],
    }
    eager = ()
    if kernel:  # the kernel is in use: the same two mixes on the eager pair, side by side
        plans["8 mixed, eager pair"] = plans["8 adapters mixed"]
        plans["uneven, eager pair"] = plans["8 mixed, uneven"]
        eager = ("8 mixed, eager pair", "uneven, eager pair")
    # One engine per scenario over the same model and slots, so their steps can alternate.
    engines = {k: Engine(model, char_tokenizer(), registry, max_batch=c) for k in plans}
    interleaved_steps({"warm": engines["8 adapters mixed"]}, {"warm": plans["8 adapters mixed"]}, 1)
    times: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(args.repeat):
        for k, t in interleaved_steps(engines, plans, args.steps, eager).items():
            times[k].extend(t)
    times = {k: sorted(v) for k, v in times.items()}
    ms = {k: round(v[(len(v) - 1) // 2], 1) for k, v in times.items()}
    p20 = {k: round(v[(len(v) - 1) // 5], 1) for k, v in times.items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    adapter = sum(d.joinpath("adapter_model.safetensors").stat().st_size for d in dirs[:1]) / 1e6
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ndecode step, shape={args.shape} (random weights, {weights:.0f} MB fp32; one r={args.rank} adapter "
          f"{adapter:.1f} MB), batch {c}, {args.repeat} rounds of {args.steps} steps per scenario, the scenarios' steps "
          f"alternating, {args.threads} threads, slots {args.slot_dtype or 'float32'}, native kernel "
          f"{'on' if kernel else 'off'}, load average {load:.1f} at the end, "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    print(
        f"{'scenario':20} {'median ms':>10} {'vs base':>8} {'p20 ms':>8} {'vs base':>8} {'vs 1 adapter':>13}"
    )
    for k in plans:
        print(f"{k:20} {ms[k]:10.1f} {ms[k] / ms['base model']:7.2f}x {p20[k]:8.1f} "
              f"{p20[k] / p20['base model']:7.2f}x {ms['1 adapter'] / ms[k]:12.2f}x")  # fmt: skip
    out = {"shape": args.shape, "config": SHAPES[args.shape], "rank": args.rank, "batch": c, "steps": args.steps,
           "repeat": args.repeat, "threads": args.threads, "slot_dtype": args.slot_dtype or "float32",
           "native_kernel": kernel, "weights_mb": round(weights), "adapter_mb": round(adapter, 1), "median_ms": ms, "p20_ms": p20,
           "step_ms": times, "load_average": load,
           "mixed_vs_base": round(ms["8 adapters mixed"] / ms["base model"], 3),
           "uneven_vs_base": round(ms["8 mixed, uneven"] / ms["base model"], 3),
           "single_vs_base": round(ms["1 adapter"] / ms["base model"], 3),
           **({"eager_mixed_vs_base": round(ms["8 mixed, eager pair"] / ms["base model"], 3)} if eager else {}),
           "mixed_tokens_vs_single": round(ms["1 adapter"] / ms["8 adapters mixed"], 3)}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
