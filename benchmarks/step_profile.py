"""A steady step-time measurement of LoRA training against the frozen base, and where the extra time goes.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py                      # interleaved rounds, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --profile --rounds 0 # the by-op table only

The SmolLM2-135M shape with random weights (bench_lora's model and adapters: r = 16, alpha = 32, all-linear,
B random), one training step = forward, loss, backward (and AdamW for the adapters), batch --batch × --seq;
--body: forward and backward of the decoder layers alone (hidden states in, a fixed random gradient out).
Configurations (--configs, any of base, d0, d0.05, d0_save_x, peft_d0, peft_d0.05) step in turn, round after
round, so machine noise hits them alike; printed: the median step (wall and process CPU time), the median
over rounds of each one's step / the base's step in the same round (wall, CPU), the ratio of the fastest steps
(min/min: the least disturbed ones) and the median minor page faults per step (a fresh page costs ~1.5-2 µs
on the project's CPU). CPU time drops what other processes take from this one, not what they take from the
shared caches and memory bandwidth: on a busy machine both ratios move by several per cent between runs.

--profile: --profile-steps torch.profiler steps per configuration, self CPU time by op (the matrix products
also summed as one row), and the ops that make up the differences d0 − base and d0.05 − d0 (the profiler's
own overhead inflates small ops alike in every column).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_lora  # noqa: E402  (the model, the adapters: one definition of the benchmark's shape)

CPU = argparse.Namespace(device="cpu")  # what bench_lora's helpers read of their args
CONFIGS = {
    "base": ("base", 0.0, False),
    "d0": ("lorakit", 0.0, False),
    "d0.05": ("lorakit", 0.05, False),
    "d0_save_x": ("lorakit", 0.0, True),
    "peft_d0": ("peft", 0.0, False),
    "peft_d0.05": ("peft", 0.05, False),
}


def make_step(args, base, name: str):
    """A closure running one training step of configuration `name` on a copy of `base`."""
    import torch
    from transformers import LlamaModel

    lib, dropout, save_x = CONFIGS[name]
    model = bench_lora.with_adapters(copy.deepcopy(base), lib, dropout, save_x=save_x)
    if not args.body:
        return bench_lora.train_step_fn(CPU, model, lib, shape=(args.batch, args.seq))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if lib != "base" else None
    model.train()
    body = next(m for m in model.modules() if isinstance(m, LlamaModel))
    g = torch.Generator().manual_seed(2)
    h = torch.randn(args.batch, args.seq, base.config.hidden_size, generator=g).requires_grad_(True)
    dy = torch.randn(h.shape, generator=g)

    def step():  # the decoder layers and the final norm only: what LoRA changes, undiluted
        body(inputs_embeds=h).last_hidden_state.backward(dy)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        h.grad = None

    return step


def rounds(steps: dict, n: int) -> dict:
    """{name: (wall times, CPU times, minor page faults)} per step over n rounds after one warm-up round,
    configurations in turn."""
    out = {k: ([], [], []) for k in steps}
    for i in range(n + 1):
        for k, fn in steps.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if i > 0:
                out[k][0].append(w)
                out[k][1].append(c)
                out[k][2].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out


def report(times: dict) -> str:
    base = times.get("base")
    lines = [
        f"{'config':<12}{'wall s':>9}{'cpu s':>9}{'wall/base':>11}{'cpu/base':>10}{'min/min':>9}{'faults':>9}"
    ]
    for k, (w, c, f) in times.items():
        rw = rc = rm = float("nan")
        if base is not None:
            rw = statistics.median(a / b for a, b in zip(w, base[0]))
            rc = statistics.median(a / b for a, b in zip(c, base[1]))
            rm = min(w) / min(base[0])
        lines.append(
            f"{k:<12}{statistics.median(w):>9.3f}{statistics.median(c):>9.3f}{rw:>11.3f}{rc:>10.3f}{rm:>9.3f}"
            f"{statistics.median(f):>9.0f}"
        )
    return "\n".join(lines)


GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def profile(steps: dict, reps: int) -> dict:
    """{config: {op: (self CPU µs, calls)}} per step, averaged over `reps` profiled steps of each
    (configurations in turn). The matrix products are also summed as one row "GEMM (mm, addmm, addmm_, bmm)":
    which of them a product is attributed to depends on where it accumulates, not on what it costs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    out: dict = {k: {} for k in steps}
    for fn in steps.values():
        fn()
    for _ in range(reps):
        for k, fn in steps.items():
            with prof(activities=[ProfilerActivity.CPU]) as p:
                fn()
            for e in p.key_averages():
                t, n = out[k].get(e.key, (0.0, 0))
                out[k][e.key] = (t + e.self_cpu_time_total / reps, n + e.count / reps)
    for ops in out.values():
        ops["GEMM (mm, addmm, addmm_, bmm)"] = (
            sum(ops.get(g, (0.0, 0))[0] for g in GEMMS),
            sum(ops.get(g, (0.0, 0))[1] for g in GEMMS),
        )
    return out


def diff_table(ops: dict, a: str, b: str, top: int) -> str:
    """The ops whose self CPU time differs most between configurations b and a (b − a), ms and calls."""
    keys = set(ops[a]) | set(ops[b])
    rows = []
    for key in keys:
        ta, na = ops[a].get(key, (0.0, 0))
        tb, nb = ops[b].get(key, (0.0, 0))
        rows.append((tb - ta, key, ta, na, tb, nb))
    rows.sort(reverse=True)
    tot_a = sum(t for k, (t, _) in ops[a].items() if not k.startswith("GEMM")) / 1e3
    tot_b = sum(t for k, (t, _) in ops[b].items() if not k.startswith("GEMM")) / 1e3
    lines = [f"{b} − {a}: total self CPU {tot_b:.1f} − {tot_a:.1f} = {tot_b - tot_a:+.1f} ms"]
    lines.append(f"{'op':<44}{'Δ ms':>9}{a + ' ms':>12}{'calls':>7}{b + ' ms':>12}{'calls':>7}")
    for d, key, ta, na, tb, nb in rows[:top] + [r for r in rows[top:] if r[0] < -1e3][-5:]:
        lines.append(f"{key[:43]:<44}{d / 1e3:>9.2f}{ta / 1e3:>12.2f}{na:>7.0f}{tb / 1e3:>12.2f}{nb:>7.0f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="base,d0,d0.05")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--body", action="store_true", help="the decoder body alone (no embedding, head, loss)")
    ap.add_argument("--profile", action="store_true", help="also a by-op table of one step per configuration")
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps per configuration")
    ap.add_argument("--top", type=int, default=18, help="rows of each difference table")
    args = ap.parse_args()
    torch = bench_lora.setup(argparse.Namespace(device=CPU.device, threads=args.threads))
    base = bench_lora.base_model(argparse.Namespace(device="cpu", dtype="fp32", layers=args.layers))
    names = args.configs.split(",")
    steps = {k: make_step(args, base, k) for k in names}
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}x{args.seq}, {args.layers} layers",
        "(body)" if args.body else "(whole step)",
    )
    if args.rounds > 0:
        print(report(rounds(steps, args.rounds)), flush=True)
    if args.profile:
        ops = profile(steps, args.profile_steps)
        for a, b in (("base", "d0"), ("d0", "d0.05")):
            if a in ops and b in ops:
                print()
                print(diff_table(ops, a, b, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
