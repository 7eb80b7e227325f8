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

--shape: instead, the decode step alone at a realistic size (no download): a random-weight model built from a
config (SHAPES), 8 random r=--rank all-linear adapters, one in-process Engine per scenario at batch
--concurrency over the same model and slots (base / 1 adapter / 8 mixed, as many rows each / 8 mixed unevenly,
4-3-2-2-2-1-1-1 rows at batch 16), their decode steps alternating one by one (a slow phase of a shared machine
hits every scenario alike), --repeat rounds of --steps steps each: the median and 20th-percentile step.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorakit  # noqa: E402
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


def random_adapters(base, tmp: Path, n: int, rank: int) -> list[Path]:
    """`n` plain r=`rank` all-linear adapters a0..a{n-1} with random factors (seeded by their index), saved under
    tmp/adapters and taken off `base` again; their directories."""
    dirs = []
    for i in range(n):
        lorakit.add_adapter(
            base, lorakit.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear"), name=f"a{i}"
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if f".lora.a{i}." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(lorakit.save_adapter(base, tmp / "adapters", name=f"a{i}"))
        lorakit.delete_adapter(base, f"a{i}")
    return dirs


KINDS = ("k_dora", "k_tokens", "k_saved")


def kinds(base, tmp: Path, rank: int) -> list[Path]:
    """A DoRA adapter, one with trainable tokens (10 rows of the embedding) and one with modules_to_save (the
    final norm), each with r=`rank` LoRA on every linear layer."""
    extra = {"k_dora": {"use_dora": True}, "k_tokens": {"trainable_token_indices": list(range(3, 13))},
             "k_saved": {"modules_to_save": ["model.norm"]}}  # fmt: skip
    dirs = []
    for i, (name, kw) in enumerate(extra.items()):
        lorakit.add_adapter(
            base, lorakit.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear", **kw), name=name
        )
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in base.named_parameters():
                if f".{name}." in pname:  # its LoRA factors, token rows and saved copy
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(lorakit.save_adapter(base, tmp / "adapters", name=name))
        lorakit.delete_adapter(base, name)
    return dirs


def char_tokenizer():
    """A character-level tokenizer (ids < 128) with ChatML specials, as the tests' tiny_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>", unk_token="<unk>")  # fmt: skip


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
    """Run the plans round-robin `repeat` times (so slow phases of a noisy machine hit every scenario) and keep,
    for each, the round with the median tokens/s; every round's tokens/s is kept under "rounds"."""
    rounds: dict[str, list[dict]] = {k: [] for k in plans}
    for _ in range(repeat):
        for k, (models, prompts, c) in plans.items():
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
           "--max-tokens-cap", str(args.max_tokens), "--model-name", "base"]  # fmt: skip
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


def interleaved_steps(engines: dict, plans: dict, steps: int) -> dict[str, list[float]]:
    """The ms of `steps` decode steps of each scenario, sorted. engines[k] (not started: driven here, as the tests
    do) gets one row per entry of plans[k]; once every row is prefilled (and one step more, a warm-up), the
    scenarios take one step each in turn, the order reversed every other turn, so a slow phase of a shared
    machine falls on all of them alike (one scenario after another, rounds moved by ±15 % here)."""
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
                engines[k]._iterate()
                times[k].append(1e3 * (time.perf_counter() - start))
        for k, engine in engines.items():
            for r in reqs[k]:
                engine.cancel(r)
            while engine.running:
                engine._iterate()
    return {k: sorted(v) for k, v in times.items()}


def scratch_dir() -> Path:
    """A fresh folder for the run's model and adapters (~150 MB to 2.5 GB), removed when the script exits."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp


UNEVEN = (0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7)  # adapter per row of the uneven mix (cycled)


def run_shape(args) -> None:
    """The decode-step comparison at `args.shape` (module docstring): prints a table, writes JSON."""
    from lorakit.serve import AdapterRegistry, Engine

    torch.set_num_threads(args.threads)
    tmp = scratch_dir()
    start = time.perf_counter()
    model, dirs = shape_model(args.shape, tmp, 8, args.rank)
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
    # One engine per scenario over the same model and slots, so their steps can alternate.
    engines = {k: Engine(model, char_tokenizer(), registry, max_batch=c) for k in plans}
    interleaved_steps({"warm": engines["8 adapters mixed"]}, {"warm": plans["8 adapters mixed"]}, 1)
    times: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(args.repeat):
        for k, t in interleaved_steps(engines, plans, args.steps).items():
            times[k].extend(t)
    times = {k: sorted(v) for k, v in times.items()}
    ms = {k: round(v[(len(v) - 1) // 2], 1) for k, v in times.items()}
    p20 = {k: round(v[(len(v) - 1) // 5], 1) for k, v in times.items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    adapter = sum(d.joinpath("adapter_model.safetensors").stat().st_size for d in dirs[:1]) / 1e6
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ndecode step, shape={args.shape} (random weights, {weights:.0f} MB fp32; one r={args.rank} adapter "
          f"{adapter:.1f} MB), batch {c}, {args.repeat} rounds of {args.steps} steps per scenario, the scenarios' steps "
          f"alternating, {args.threads} threads, slots {args.slot_dtype or 'float32'}, load average {load:.1f} at the end, "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    print(
        f"{'scenario':20} {'median ms':>10} {'vs base':>8} {'p20 ms':>8} {'vs base':>8} {'vs 1 adapter':>13}"
    )
    for k in plans:
        print(f"{k:20} {ms[k]:10.1f} {ms[k] / ms['base model']:7.2f}x {p20[k]:8.1f} "
              f"{p20[k] / p20['base model']:7.2f}x {ms['1 adapter'] / ms[k]:12.2f}x")  # fmt: skip
    out = {"shape": args.shape, "config": SHAPES[args.shape], "rank": args.rank, "batch": c, "steps": args.steps,
           "repeat": args.repeat, "threads": args.threads, "slot_dtype": args.slot_dtype or "float32",
           "weights_mb": round(weights), "adapter_mb": round(adapter, 1), "median_ms": ms, "p20_ms": p20,
           "step_ms": times, "load_average": load,
           "mixed_vs_base": round(ms["8 adapters mixed"] / ms["base model"], 3),
           "uneven_vs_base": round(ms["8 mixed, uneven"] / ms["base model"], 3),
           "single_vs_base": round(ms["1 adapter"] / ms["base model"], 3),
           "mixed_tokens_vs_single": round(ms["1 adapter"] / ms["8 adapters mixed"], 3)}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


def run_in_process(args, model: str, dirs: list[Path], plans: dict, max_adapters: int) -> dict:
    """Each plan through an in-process `Engine` (what the server runs, minus HTTP)."""
    from lorakit.serve import AdapterRegistry, Engine

    m, tok = load_model(model, device=args.device)
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
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
