"""Server throughput: 8 adapters mixed in one batch vs 1 adapter vs the base vs one request at a time.

    python benchmarks/bench_serve.py                    # SmolLM2-135M ("default"), 8 random r=16 adapters
    python benchmarks/bench_serve.py --model tiny       # a tiny random Llama (seconds; checks the plumbing)
    python benchmarks/bench_serve.py --many 128 --max-adapters 8 16   # also: 128 distinct adapters in the
                                                        # stream, 8 resident, then (another server) 16

Scenarios (one table): 8 plain r=16 adapters mixed in the batch, 1 adapter, the base model (the columns "vs 1
adapter" and "vs base" are the issue's two ratios), 8 mixed of which 3 are what vLLM refuses (a DoRA adapter,
one with trainable tokens, one with modules_to_save, served per row beside 5 plain ones), one request at a
time, and with --many N distinct adapters in the stream, --max-adapters resident (the rest reloaded from the
CPU cache on demand; one such scenario per --max-adapters value, each extra value on its own server). The
header also gives the time to make one cached adapter resident and evict it again (median, in process).

Starts `lorakit serve` as a subprocess on loopback, sends the same prompts in each scenario (each request
generates exactly --max-tokens tokens: `ignore_eos`; streamed, so the first token's arrival is seen), and
reports completion tokens/s over the wall time of the scenario, p50 / p99 time to first token (TTFT) and
request latency, and the ratios. Prints a table and writes JSON (--out).

    python benchmarks/bench_serve.py --shape llama-1b --out benchmarks/results/serve_llama1b_cpu2.json

--shape: instead, the decode step alone at a realistic size (serve_shape.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from serve_data import KINDS, char_tokenizer, kinds, random_adapters, scratch_dir  # noqa: E402
from serve_shape import SHAPES, run_shape  # noqa: E402

from lorakit.models import load_model  # noqa: E402

WORDS = "the a of river mountain city light dark quick slow write read story number answer question".split()


def prepare(model: str, tmp: Path, n_adapters: int, rank: int) -> tuple[str, list[Path]]:
    """The model spec to serve and `n_adapters` random adapters for it (different values each)."""
    if model in ("tiny", "smollm2-random"):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        if model == "tiny":
            cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
        else:  # SmolLM2-135M's shapes with random weights: the same compute, for machines without the file
            cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                              tie_word_embeddings=True, rope_theta=100000, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(tmp / model)
        char_tokenizer().save_pretrained(tmp / model)
        model = str(tmp / model)
    base, _ = load_model(model)
    return model, random_adapters(base, tmp, n_adapters, rank) + kinds(base, tmp, rank)


def engine_scenario(engine, models, prompts, concurrency, max_tokens) -> dict:
    """The same measurement in process (no HTTP): `concurrency` is the engine's batch size."""
    from lorakit.serve import Request

    engine.max_batch = concurrency
    reqs = [Request(engine.tokenizer(p)["input_ids"], None if m == "base" else m, max_tokens, temperature=0,
                    ignore_eos=True) for m, p in zip(models, prompts)]  # fmt: skip
    start = time.perf_counter()
    if concurrency == 1:
        for r in reqs:
            engine.generate([r])
    else:
        engine.generate(reqs)
    wall = time.perf_counter() - start
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    lat = [r.finished - r.submitted for r in reqs]
    ttft = [r.first_token - r.submitted for r in reqs]
    return summary(len(reqs), concurrency, sum(r.completion_tokens for r in reqs), wall, lat, ttft)


def summary(requests: int, concurrency: int, tokens: int, wall: float, lat: list, ttft: list) -> dict:
    q = lambda xs, p: round(float(torch.tensor(xs).quantile(p)), 3)  # noqa: E731
    return {"requests": requests, "concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": q(lat, 0.5), "p99_s": q(lat, 0.99),
            "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99)}  # fmt: skip


async def scenario(
    url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int
) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies, ttfts, tokens = [], [], 0

    async def one(client, model, prompt):
        nonlocal tokens
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        async with sem:
            t, first = time.perf_counter(), None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    if first is None and any(c.get("text") for c in event["choices"]):
                        first = time.perf_counter() - t
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t)
            ttfts.append(first if first is not None else latencies[-1])

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, m, p) for m, p in zip(models, prompts)))
        wall = time.perf_counter() - start
    return summary(len(prompts), concurrency, tokens, wall, latencies, ttfts)


def repeated(plans: dict, repeat: int, run) -> dict:
    """Run the plans round-robin `repeat` times (so slow phases of a noisy machine hit every scenario), the order
    reversed every other round (a scenario's place in the round, e.g. right after the one-at-a-time one, then
    falls on each alike), and keep, for each, the round with the median tokens/s; every round's tokens/s is kept
    under "rounds" (in round order)."""
    rounds: dict[str, list[dict]] = {k: [] for k in plans}
    for i in range(repeat):
        for k in list(plans) if i % 2 == 0 else list(plans)[::-1]:
            models, prompts, c = plans[k]
            rounds[k].append(run(models, prompts, c))
    out = {}
    for k, rs in rounds.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        out[k] = {**rs[(len(rs) - 1) // 2], "rounds": [r["tokens_per_s"] for r in rounds[k]]}
    return out


def swap_ms(model: str, dirs: list[Path], rounds: int = 40) -> float:
    """Median ms to make one cached adapter resident and evict another (`AdapterRegistry.acquire` with every
    slot taken by an idle adapter): 8 slots, 10 adapters cycled."""
    from lorakit.serve import AdapterRegistry

    m, _ = load_model(model)
    registry = AdapterRegistry(m, "base", max_loaded=8)
    names = [d.name for d in dirs[:10]]
    for d in dirs[:10]:
        registry.add(d.name, d)
    times = []
    with torch.inference_mode():
        for k in range(rounds):
            start = time.perf_counter()
            assert registry.acquire(names[k % len(names)])
            times.append(time.perf_counter() - start)
            registry.release(names[k % len(names)])
    return round(1e3 * sorted(times)[len(times) // 2], 2)


def run_server(args, model: str, dirs: list[Path], plans: dict, max_adapters: int) -> dict:
    """Each plan through `lorakit serve` in a subprocess, over HTTP, `max_adapters` resident."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", model, "--port", str(port),
           "--max-adapters", str(max_adapters), "--adapter-cache-mb", str(args.adapter_cache_mb),
           "--max-batch", str(args.concurrency), "--threads", str(args.threads), "--log-level", "warning",
           "--max-tokens-cap", str(args.max_tokens), "--model-name", "base",
           "--native-kernel", args.native_kernel]  # fmt: skip
    cmd += ["--device", args.device] if args.device else []
    for d in dirs:
        cmd += ["--adapter", f"{d.name}={d}"]
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        names = [*KINDS, *(d.name for d in dirs[:8])]  # plain ones last: resident for the first scenario
        asyncio.run(scenario(url, names, ["warm up"] * len(names), 8, 4))  # every adapter once
        return repeated(
            plans, args.repeat, lambda m, p, c: asyncio.run(scenario(url, m, p, c, args.max_tokens))
        )
    finally:
        server.terminate()
        server.wait(30)


def run_in_process(args, model: str, dirs: list[Path], plans: dict, max_adapters: int) -> dict:
    """Each plan through an in-process `Engine` (what the server runs, minus HTTP)."""
    from lorakit.serve import AdapterRegistry, Engine
    from lorakit.serve.commands import load_native_kernel

    m, tok = load_model(model, device=args.device)
    load_native_kernel(args.native_kernel, m)
    registry = AdapterRegistry(
        m, "base", max_loaded=max_adapters, cache_bytes=int(args.adapter_cache_mb * 2**20)
    )
    for d in dirs:
        registry.add(d.name, d)
    # Not started: generate() runs the loop on this thread, the one that loaded the model (Engine.run says why).
    engine = Engine(m, tok, registry, max_batch=args.concurrency)
    names = [*KINDS, *(d.name for d in dirs[:8])]  # plain ones last: resident for the first scenario
    engine_scenario(engine, names, ["warm up"] * len(names), 8, 4)
    return repeated(plans, args.repeat, lambda ms, p, c: engine_scenario(engine, ms, p, c, args.max_tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M), 'tiny', or a model directory"
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=8, help="requests in the one-at-a-time scenario")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="bench_serve.json")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all scenarios; the median is reported")
    ap.add_argument("--engine-only", action="store_true", help="drive the engine in process, without HTTP")
    ap.add_argument(
        "--many",
        type=int,
        default=0,
        metavar="N",
        help="add a scenario whose requests name N distinct adapters (N >= 8), --max-adapters resident",
    )
    ap.add_argument(
        "--max-adapters",
        type=int,
        nargs="+",
        default=[8],
        help="adapters resident on the model (the server's flag); several: one --many scenario each",
    )
    ap.add_argument(
        "--adapter-cache-mb",
        type=float,
        default=4096,
        help="the server's CPU cache of adapters (default: room for 128 r=16 SmolLM2 adapters)",
    )
    ap.add_argument("--native-kernel", choices=["auto", "on", "off"], default="auto",
                    help="lorakit serve's --native-kernel (and --shape's: with the kernel on, the mixes run on the "
                         "eager pair too, side by side)")  # fmt: skip
    ap.add_argument("--shape", choices=sorted(SHAPES), help="the decode-step comparison at this size instead")
    ap.add_argument("--steps", type=int, default=6, help="--shape: decode steps timed per scenario and round")
    ap.add_argument("--slot-dtype", choices=["bfloat16"], help="--shape: the slots' dtype (default: float32)")
    args = ap.parse_args()
    if args.shape:
        return run_shape(args)
    torch.set_num_threads(args.threads)
    tmp = scratch_dir()
    model, dirs = prepare(args.model, tmp, max(8, args.many), args.rank)
    n, c = args.requests, args.concurrency
    prompts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 9)) for i in range(n)]
    names = [d.name for d in dirs[:8]]
    mixed_kinds = [*KINDS, *names[:5]]
    plans = {
        "8 adapters mixed": ([names[i % 8] for i in range(n)], prompts, c),
        "1 adapter": (["a0"] * n, prompts, c),
        "base model": (["base"] * n, prompts, c),
        "8 mixed, DoRA+tokens+saved": ([mixed_kinds[i % 8] for i in range(n)], prompts, c),
        "one at a time (mixed)": ([names[i % 8] for i in range(args.sequential)], prompts[: args.sequential], 1),
    }  # fmt: skip
    many_plans = {}
    if args.many:
        many = [dirs[i % args.many].name for i in range(max(n, args.many))]
        for k in args.max_adapters:
            many_plans[k] = {
                f"{args.many} adapters over {k} slots": (many, [prompts[i % n] for i in range(len(many))], c)
            }
    swap = swap_ms(model, dirs)
    run = run_in_process if args.engine_only else run_server
    first = args.max_adapters[0]
    results = run(args, model, dirs, {**plans, **many_plans.get(first, {})}, first)
    for k in args.max_adapters[1:]:
        results.update(run(args, model, dirs, many_plans.get(k, {}), k) if args.many else {})
    ref = results["1 adapter"]["tokens_per_s"]
    base_ref = results["base model"]["tokens_per_s"]
    how = "engine in process" if args.engine_only else "HTTP server"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nlorakit serve ({how}), model={args.model}, {args.max_tokens} tokens per request, rank {args.rank} all-linear, "
          f"{args.threads} threads, device={args.device or 'cpu'}, --max-adapters {' '.join(map(str, args.max_adapters))}, "
          f"load average {load:.1f} at the end; making a cached adapter resident + evicting one: {swap} ms")  # fmt: skip
    print(f"{'scenario':30} {'requests':>8} {'conc':>5} {'tokens/s':>9} {'vs 1 adapter':>13} {'vs base':>8} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'p50 s':>7} {'p99 s':>7}")  # fmt: skip
    for k, r in results.items():
        print(f"{k:30} {r['requests']:8d} {r['concurrency']:5d} {r['tokens_per_s']:9.1f} "
              f"{r['tokens_per_s'] / ref:12.2f}x {r['tokens_per_s'] / base_ref:7.2f}x {r['ttft_p50_s']:9.3f} "
              f"{r['ttft_p99_s']:9.3f} {r['p50_s']:7.3f} {r['p99_s']:7.3f}")  # fmt: skip
    out = {"model": args.model, "max_tokens": args.max_tokens, "rank": args.rank, "threads": args.threads,
           "many": args.many, "max_adapters": args.max_adapters, "adapter_cache_mb": args.adapter_cache_mb,
           "swap_ms": swap,
           "device": args.device or "cpu", "engine_only": args.engine_only, "results": results,
           "load_average": load, "mixed_vs_single": round(results["8 adapters mixed"]["tokens_per_s"] / ref, 3),
           "mixed_vs_base": round(results["8 adapters mixed"]["tokens_per_s"] / base_ref, 3),
           "kinds_vs_single": round(results["8 mixed, DoRA+tokens+saved"]["tokens_per_s"] / ref, 3),
           "mixed_vs_one_at_a_time": round(results["8 adapters mixed"]["tokens_per_s"]
                                           / results["one at a time (mixed)"]["tokens_per_s"], 2)}  # fmt: skip
    mixed, single = results["8 adapters mixed"]["rounds"], results["1 adapter"]["rounds"]
    out["mixed_vs_single_per_round"] = round(statistics.median(a / b for a, b in zip(mixed, single)), 3)
    print(
        f"8 adapters mixed / 1 adapter, the median of the rounds' own ratios: {out['mixed_vs_single_per_round']}"
    )
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
