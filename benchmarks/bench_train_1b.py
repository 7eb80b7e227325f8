"""Training at a realistic size: Llama-3.2-1B's shapes, bf16, seq 2048: base / lorakit / PEFT, eager and compiled.

    python benchmarks/bench_train_1b.py --device cuda                  # the GPU run (a few minutes on an H100)
    python benchmarks/bench_train_1b.py --device cpu --dtype fp32 --layers 1 --seq 32 --no-compile  # a smoke test

Random weights from Llama-3.2-1B's config (nothing is downloaded; 16 layers, d = 2048, V = 128256, tied head),
r = 16, alpha = 32, all linear layers, dropout 0, one fixed random batch of --batch × --seq tokens. All
configurations live in one process and take their steps in turn (so a slow phase hits all alike); the first
round is the warm-up (and holds each compiled configuration's one compilation).

- step: forward, loss, backward, AdamW for the adapters (the frozen base has no optimizer and backpropagates to
  its input embeddings, so every layer runs its backward), synchronised; the median over --steps rounds, and
  the median of the per-round ratios to the base and to PEFT.
- memory (CUDA): what one step allocates above what was allocated before it (the models, AdamW's state),
  `max_memory_allocated` after `reset_peak_memory_stats`, median over the rounds; "overhead" is that minus the
  base's. On CPU no allocator statistics exist: reported as nan.
- compile: `lorakit.train.compile.compiled`, what `lorakit train --compile` does (the transformer body,
  `Module.compile(dynamic=True)`, the head and loss eager), applied to the same body of the PEFT model.
- the loss is the plain one (full logits) in every configuration, so the LoRA paths are compared; the extra
  row `lorakit_chunkCE` is lorakit train's default chunked loss (`--loss-chunk 1024`).

Issue 11's goals at this size: lorakit's step ≤ 0.8× PEFT's and its memory overhead ≤ 0.5× PEFT's, with and
without compile. Prints one table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from bench_lora import machine, save, sync, train_step_fn, with_adapters  # noqa: E402

CONFIGS = {  # name: (library, compiled, loss chunk)
    "base": ("base", False, 0),
    "lorakit": ("lorakit", False, 0),
    "peft": ("peft", False, 0),
    "lorakit_chunkCE": ("lorakit", False, 1024),
    "base_compiled": ("base", True, 0),
    "lorakit_compiled": ("lorakit", True, 0),
    "peft_compiled": ("peft", True, 0),
}


def llama_1b_config(layers: int, vocab: int = 128256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip


def build(args):
    """The frozen base model, on the device in the benchmark's dtype."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = LlamaForCausalLM(llama_1b_config(args.layers, args.vocab)).to(device=args.device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def run(args) -> dict:
    """{config: {"step_s": [...], "step_mb": [...]}} over the timed rounds (see the module docstring)."""
    import torch

    from lorakit.train.compile import compiled

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    base = build(args)
    names = [n for n in args.configs if args.compile or not CONFIGS[n][1]]
    steps, stack = {}, contextlib.ExitStack()
    for n in names:
        lib, compile_on, chunk = CONFIGS[n]
        model = with_adapters(copy.deepcopy(base), lib, 0.0)
        stack.enter_context(compiled(hf_model(model), compile_on))
        steps[n] = train_step_fn(args, model, lib, chunk, shape=(args.batch, args.seq))
    del base
    out = {n: {"step_s": [], "step_mb": []} for n in names}
    with stack:
        for i in range(args.steps + 1):
            for n, step in steps.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() if cuda else 0
                sync(args)
                t0 = time.perf_counter()
                step()  # synchronises
                t = time.perf_counter() - t0
                if i == 0:  # warm-up (and compilation)
                    print(f"[bench] {n}: first step {t:.1f} s", flush=True)
                    continue
                out[n]["step_s"].append(t)
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else float("nan")
                out[n]["step_mb"].append(peak)
    return out


def ratio(res: dict, a: str, b: str) -> float:
    """Median over rounds of a's step time / b's in the same round (nan when either is missing)."""
    if a not in res or b not in res:
        return float("nan")
    return statistics.median(x / y for x, y in zip(res[a]["step_s"], res[b]["step_s"]))


def table(res: dict, header: str) -> str:
    nan = float("nan")
    lines = [header, f"{'config':<18}{'step s':>9}{'/ base':>9}{'/ PEFT':>9}{'step MB':>10}{'overhead MB':>13}"
                     f"{'/ PEFT':>9}"]  # fmt: skip
    for n, r in res.items():
        compiled_on = n.endswith("_compiled")
        base, peft = ("base_compiled", "peft_compiled") if compiled_on else ("base", "peft")
        mb = statistics.median(r["step_mb"])
        base_mb = statistics.median(res[base]["step_mb"]) if base in res else nan
        peft_over = statistics.median(res[peft]["step_mb"]) - base_mb if peft in res else nan
        over = mb - base_mb
        lines.append(
            f"{n:<18}{statistics.median(r['step_s']):>9.3f}{ratio(res, n, base):>9.3f}"
            f"{ratio(res, n, peft) if n.startswith('lorakit') else nan:>9.3f}{mb:>10.0f}{over:>13.0f}"
            f"{over / peft_over if n.startswith('lorakit') and peft_over > 0 else nan:>9.2f}"
        )
    lines.append(
        "/ base, / PEFT: median over rounds of the ratio within a round; step MB: allocated by one step"
    )
    lines.append(
        "above what was allocated before it; overhead: that minus the base's (eager or compiled alike)"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16 = Llama-3.2-1B)")
    ap.add_argument(
        "--vocab", type=int, default=128256, help="vocabulary (>= 49152: the batch's ids are below it)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds after the warm-up round")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled configs")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/train_1b_<device>.json)"
    )
    args = ap.parse_args()
    if args.vocab < 49152:
        ap.error("--vocab must be at least 49152 (the random batch's token ids are below it)")
    start = time.time()
    res = run(args)
    import torch

    header = (f"{machine(args)}; Llama-3.2-1B shapes ({args.layers} layers), {args.dtype}, batch {args.batch} x "
              f"{args.seq}, r=16 all-linear, dropout 0, {args.steps} rounds")  # fmt: skip
    text = table(res, header)
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / f"train_1b_{args.device.split(':')[0]}.json"
    save(out, {"machine": machine(args), "torch": torch.__version__, "args": vars(args), "results": res,
               "seconds": time.time() - start, "table": text})  # fmt: skip
    print(f"[bench] wrote {out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
