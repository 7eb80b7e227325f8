"""Training and inference speed / memory: frozen base vs lorakit vs PEFT, on the SmolLM2-135M shape.

    python benchmarks/bench_lora.py                          # CPU, fp32, the full run (a few minutes)
    python benchmarks/bench_lora.py --device cuda --dtype bf16
    python benchmarks/bench_lora.py --quick                  # fewer repetitions, for a smoke test

One command runs everything and prints one table; the same figures go to benchmarks/results/<tag>.json.
Random weights from SmolLM2-135M's config (nothing is downloaded). r = 16, alpha = 32, all linear layers.

- Training (batch 4×256): median step time (forward, loss, backward, AdamW step for the adapters; the frozen
  base has no optimizer but backpropagates to its input embeddings, so every layer runs its backward). All
  configurations live in one process and take their steps in turn, so machine noise hits them alike.
  Peak memory: each configuration again in its own process (peak RSS on CPU, max_memory_allocated on CUDA).
- Inference (no_grad): prefill 16×128 and decode (16 rows × 1 token over a 128-token KV cache): base,
  one unmerged adapter, a mixed batch over 8 adapters (rows sorted by adapter, 2 each; lorakit also unsorted),
  merged. lorakit and PEFT models are built from the same base weights and timed in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

TRAIN_CONFIGS = {
    "base": {"lib": "base", "dropout": 0.0},
    "lorakit_d0": {"lib": "lorakit", "dropout": 0.0},
    "lorakit_d0.05": {"lib": "lorakit", "dropout": 0.05},
    "lorakit_d0_chunkCE": {"lib": "lorakit", "dropout": 0.0, "chunk": 1024},
    "lorakit_d0_save_x": {"lib": "lorakit", "dropout": 0.0, "save_x": True},
    "peft_d0": {"lib": "peft", "dropout": 0.0},
    "peft_d0.05": {"lib": "peft", "dropout": 0.05},
}
R, ALPHA = 16, 32


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip


def setup(args):
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch


def dtype_of(args):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def base_model(args):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_config()
    cfg.num_hidden_layers = args.layers
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype_of(args))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def with_adapters(model, lib, dropout, names=("default",), save_x=False):
    """Add adapters (B random so that nothing is trivially zero) in place; returns the model to call.
    save_x: lorakit saves every layer input instead of rebuilding it in backward (fast.set_recompute)."""
    import torch

    if lib == "base":
        model.enable_input_require_grads()
        return model
    if lib == "lorakit":
        import lorakit

        for n in names:
            cfg = lorakit.LoraConfig(r=R, alpha=ALPHA, dropout=dropout, targets="all-linear")
            lorakit.add_adapter(model, cfg, name=n)
        lorakit.set_adapter(model, names[0])
        if save_x:
            from lorakit.fast import set_recompute

            set_recompute(model, False)
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear")
        model = get_peft_model(model, cfg, adapter_name=names[0])
        for n in names[1:]:
            model.add_adapter(n, cfg)
        model.set_adapter(names[0])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.01))
    return model


def sync(args):
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_fn(args, model, lib, chunk=0, shape=(4, 256)):
    """One training step (forward, loss, backward, AdamW for what trains) on a fixed random batch of `shape`."""
    import torch

    from lorakit.losses import causal_lm_loss

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 49152, shape, generator=g).to(args.device)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if lib != "base" else None
    model.train()

    def step():
        loss, n = causal_lm_loss(model, ids, mask, ids, chunk=chunk)
        (loss / n).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(args)

    return step


def timed(args, fn) -> float:
    sync(args)
    t0 = time.perf_counter()
    fn()
    sync(args)
    return time.perf_counter() - t0


# -- workers (each runs in its own process) ---------------------------------------------------------------------


def worker_train_time(args) -> dict:
    import copy

    setup(args)
    base = base_model(args)
    steps = {}
    for name, c in TRAIN_CONFIGS.items():
        if c["lib"] == "peft" and args.skip_peft:
            continue
        model = with_adapters(copy.deepcopy(base), c["lib"], c["dropout"], save_x=c.get("save_x", False))
        steps[name] = train_step_fn(args, model, c["lib"], c.get("chunk", 0))
    times = {n: [] for n in steps}
    for i in range(args.steps + 1):
        for n, fn in steps.items():
            t = timed(args, fn)
            if i > 0:  # the first round is a warm-up
                times[n].append(t)
    return {n: {"median_s": statistics.median(ts), "all_s": ts} for n, ts in times.items()}


def worker_train_mem(args) -> dict:
    torch = setup(args)
    c = TRAIN_CONFIGS[args.config]
    model = with_adapters(base_model(args), c["lib"], c["dropout"], save_x=c.get("save_x", False))
    step = train_step_fn(args, model, c["lib"], c.get("chunk", 0))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    if args.device.startswith("cuda"):
        return {
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "what": "torch.cuda.max_memory_allocated",
        }
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "what": "peak RSS"}


def _decode_fn(args, model, cache, tok, **kw):
    from lorakit.serve.kvcache import cache_argument

    # (PEFT's own forward takes **kwargs: read its transformers model's)
    kw[cache_argument(model.get_base_model() if hasattr(model, "get_base_model") else model)] = cache

    def run():
        model(input_ids=tok, use_cache=True, **kw)
        _crop_to(cache, 128)

    return run


def _crop_to(cache, length: int) -> None:
    """Cut the KV cache back to `length` tokens (transformers 5.2x: crop(-k) removes k; older: crop(max_len))."""
    n = cache.get_seq_length()
    if n == length:
        return
    try:
        cache.crop(length - n)
    except ValueError:
        cache.crop(length)
    if cache.get_seq_length() != length:
        raise RuntimeError(f"could not crop the KV cache back to {length} tokens")


def worker_infer(args) -> dict:
    import copy

    torch = setup(args)
    import lorakit

    names = [f"a{i}" for i in range(8)]
    base = base_model(args).eval()
    lk = with_adapters(copy.deepcopy(base), "lorakit", 0.0, names).eval()
    pf = None if args.skip_peft else with_adapters(copy.deepcopy(base), "peft", 0.0, names).eval()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 49152, (16, 128), generator=g).to(args.device)
    tok = torch.randint(3, 49152, (16, 1), generator=g).to(args.device)
    sorted_rows = [n for n in names for _ in range(2)]
    unsorted_rows = names + names

    def lk_rows(rows, x, **kw):
        def run():
            with lorakit.per_row_adapters(lk, rows):
                lk(input_ids=x, **kw)

        return run

    with torch.no_grad():
        cache = {}
        for key, m in (("base", base), ("lk", lk), ("peft", pf)):
            if m is not None:
                cache[key] = m(input_ids=prompt, use_cache=True).past_key_values
        fns = {
            "prefill/base": lambda: base(input_ids=prompt),
            "prefill/lorakit_single": lambda: lk(input_ids=prompt),
            "prefill/lorakit_mixed8": lk_rows(sorted_rows, prompt),
            "prefill/lorakit_mixed8_unsorted": lk_rows(unsorted_rows, prompt),
            "decode/base": _decode_fn(args, base, cache["base"], tok),
            "decode/lorakit_single": _decode_fn(args, lk, cache["lk"], tok),
        }
        lk_dec = _decode_fn(args, lk, cache["lk"], tok)

        def lk_dec_ctx_per_step():
            with lorakit.per_row_adapters(lk, sorted_rows):
                lk_dec()

        # A generation loop holds one per_row_adapters context for all its steps: a second copy of the
        # model stays inside one for the whole timing (its first step builds the stacked decode factors).
        lk2 = copy.deepcopy(lk)
        held = lorakit.per_row_adapters(lk2, sorted_rows)
        held.__enter__()
        fns["decode/lorakit_mixed8"] = _decode_fn(args, lk2, cache["lk"], tok)
        fns["decode/lorakit_mixed8_ctx_per_step"] = lk_dec_ctx_per_step
        if pf is not None:
            fns.update(
                {
                    "prefill/peft_single": lambda: pf(input_ids=prompt),
                    "prefill/peft_mixed8": lambda: pf(input_ids=prompt, adapter_names=sorted_rows),
                    "decode/peft_single": _decode_fn(args, pf, cache["peft"], tok),
                    "decode/peft_mixed8": _decode_fn(args, pf, cache["peft"], tok, adapter_names=sorted_rows),
                }
            )
        out = _interleave(args, fns, args.infer_reps)
        held.__exit__(None, None, None)
        del lk2
        lorakit.merge(lk)
        merged = {
            "prefill/base": fns["prefill/base"],
            "prefill/lorakit_merged": lambda: lk(input_ids=prompt),
            "decode/base": fns["decode/base"],
            "decode/lorakit_merged": _decode_fn(args, lk, cache["lk"], tok),
        }
        if pf is not None:
            pf.merge_adapter()
            merged["prefill/peft_merged"] = lambda: pf(input_ids=prompt)
            merged["decode/peft_merged"] = _decode_fn(args, pf, cache["peft"], tok)
        m = _interleave(args, merged, args.infer_reps)
        out.update({k: v for k, v in m.items() if "merged" in k})
        out["prefill/base_during_merged"] = m["prefill/base"]
        out["decode/base_during_merged"] = m["decode/base"]
    return out


def _interleave(args, fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            times[n].append(timed(args, fn))
    return {n: {"median_s": statistics.median(ts), "all_s": ts} for n, ts in times.items()}


# -- driver -----------------------------------------------------------------------------------------------------


def run_worker(args, worker: str, config: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker] + _common_flags(args)
    if config:
        cmd += ["--config", config]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"worker {worker} {config or ''} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _common_flags(args) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    flags += ["--steps", str(args.steps), "--infer-reps", str(args.infer_reps), "--layers", str(args.layers)]
    return flags + (["--skip-peft"] if args.skip_peft else [])


def machine(args) -> str:
    import torch

    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {args.threads} threads of {os.cpu_count()} cores (torch {torch.__version__})"


def round_ratio(tr: dict, a: str, b: str) -> float:
    """Median over rounds of a's step time / b's step time in the same round (nan when either is missing)."""
    ta, tb = tr.get(a, {}).get("all_s"), tr.get(b, {}).get("all_s")
    if not ta or not tb or len(ta) != len(tb):
        return float("nan")
    return statistics.median(x / y for x, y in zip(ta, tb))


def table(res: dict) -> str:
    tr, mem, inf = res.get("train_time") or {}, res.get("train_mem") or {}, res.get("infer") or {}
    nan = float("nan")
    base_t = tr.get("base", {}).get("median_s", nan)
    base_m = mem.get("base", {}).get("peak_mb", nan)
    lines = [f"machine: {res['machine']}; dtype {res['dtype']}", "", "training, batch 4x256, r=16 all-linear"]
    lines.append(
        f"{'config':<22}{'step s':>9}{'/ base':>9}{'/ base*':>9}{'/ PEFT*':>9}{'peak MB':>10}{'+MB over base':>15}"
    )
    for n in [*tr, *(k for k in mem if k not in tr)]:  # memory alone (--only mem) prints its rows too
        t = tr.get(n, {}).get("median_s", nan)
        m = mem.get(n, {}).get("peak_mb", nan)
        peft = "peft_d0.05" if "d0.05" in n else "peft_d0"
        vs_base, vs_peft = (
            round_ratio(tr, n, "base"),
            round_ratio(tr, n, peft) if n.startswith("lorakit") else nan,
        )
        lines.append(
            f"{n:<22}{t:>9.3f}{t / base_t:>9.3f}{vs_base:>9.3f}{vs_peft:>9.3f}{m:>10.0f}{m - base_m:>15.0f}"
        )
    lines.append(
        "* median over rounds of the ratio within a round (the configurations step in turn, so a round's"
    )
    lines.append("  steps share the machine's state: steadier than the ratio of medians on a noisy machine)")
    for d in ("d0", "d0.05"):
        a, b = f"lorakit_{d}", f"peft_{d}"
        if a in mem and b in mem and mem[b]["peak_mb"] > base_m:
            ratio = (mem[a]["peak_mb"] - base_m) / (mem[b]["peak_mb"] - base_m)
            lines.append(f"memory overhead lorakit / PEFT at {d}: {ratio:.2f}")
    lines += ["", "inference (no_grad), median seconds and ratios"]

    def r(a, b):
        return inf[a]["median_s"] / inf[b]["median_s"] if a in inf and b in inf else float("nan")

    lines.append(f"{'':<10}{'what':<36}{'lorakit':>10}{'PEFT':>10}")
    for ph in ("prefill", "decode"):
        rows = [
            ("unmerged single / base", r(f"{ph}/lorakit_single", f"{ph}/base"), r(f"{ph}/peft_single", f"{ph}/base")),
            ("mixed 8 / single", r(f"{ph}/lorakit_mixed8", f"{ph}/lorakit_single"),
             r(f"{ph}/peft_mixed8", f"{ph}/peft_single")),
            ("mixed 8 unsorted / single", r(f"{ph}/lorakit_mixed8_unsorted", f"{ph}/lorakit_single"), float("nan")),
            ("mixed 8, context per step / single", r(f"{ph}/lorakit_mixed8_ctx_per_step", f"{ph}/lorakit_single"),
             float("nan")),
            ("merged / base", r(f"{ph}/lorakit_merged", f"{ph}/base_during_merged"),
             r(f"{ph}/peft_merged", f"{ph}/base_during_merged")),
        ]  # fmt: skip
        for what, a, b in rows:
            lines.append(f"{ph:<10}{what:<36}{a:>10.3f}{b:>10.3f}")
        lines.append(f"{ph:<10}{'base seconds':<36}{inf.get(f'{ph}/base', {}).get('median_s', nan):>10.4f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    ap.add_argument("--infer-reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="2 steps, 3 inference repetitions")
    ap.add_argument(
        "--layers", type=int, default=30, help="decoder layers (30 = SmolLM2-135M; fewer: smoke test)"
    )
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/<device>_<dtype>.json)"
    )
    ap.add_argument("--only", default="train,mem,infer", help="phases to run, comma-separated")
    ap.add_argument("--table", nargs="+", default=None, help="print the table of these JSON files (merged)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.infer_reps = 2, 3
    if args.worker:
        fn = {"train-time": worker_train_time, "train-mem": worker_train_mem, "infer": worker_infer}[
            args.worker
        ]
        print(json.dumps(fn(args)))
        return 0

    if args.table:
        res = {}
        for f in args.table:  # parts measured by separate --only runs, merged
            part = json.loads(Path(f).read_text())
            res.update({k: v for k, v in part.items() if v or k not in res})
        print(table(res))
        return 0
    t0 = time.time()
    out = Path(args.out) if args.out else HERE / "results" / f"{args.device.split(':')[0]}_{args.dtype}.json"
    res = {"machine": machine(args), "device": args.device, "dtype": args.dtype, "threads": args.threads}
    res.update({"layers": args.layers, "train_time": {}, "train_mem": {}, "infer": {}})
    print(f"[bench] {res['machine']}", flush=True)
    phases = args.only.split(",")
    if "train" in phases:
        res["train_time"] = run_worker(args, "train-time")
        save(out, res)  # each phase is saved as it completes, so a run cut short keeps what it measured
        print("[bench] training timed", flush=True)
    if "mem" in phases:
        for name, c in TRAIN_CONFIGS.items():
            if c["lib"] == "peft" and args.skip_peft:
                continue
            res["train_mem"][name] = run_worker(args, "train-mem", name)
        save(out, res)
        print("[bench] training memory measured", flush=True)
    if "infer" in phases:
        res["infer"] = run_worker(args, "infer")
    res["seconds"] = time.time() - t0
    res["table"] = table(res)
    save(out, res)
    print(res["table"])
    print(f"[bench] wrote {out} in {res['seconds']:.0f} s")
    return 0


def save(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
