"""Memory of one LoRA training step with the base in full precision, 8-bit or 4-bit (QLoRA).

Each setting runs in its own process (so peak RSS is its own): prepare() the model as `lorakit train` does,
then forward + backward + AdamW step on a batch of random tokens. Prints one JSON line per setting and a
table: peak RSS (CPU), peak CUDA memory allocated (on CUDA), weights resident, trainable parameters.

    python benchmarks/qlora_memory.py                        # the default model, on CPU
    python benchmarks/qlora_memory.py --device cuda
    python benchmarks/qlora_memory.py --config-only default  # same shapes, random weights (no checkpoint)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(args) -> dict:
    import torch

    from lorakit.train.config import TrainConfig
    from lorakit.train.prepare import prepare

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        model=args.model,
        quantize=args.quantize,
        rank=16,
        gradient_checkpointing=args.checkpointing,
        dtype=args.dtype,
    )
    model = tokenizer = None
    if args.config_only:
        model, tokenizer = _random_model(args.model, args.quantize, args.device, args.dtype)
    p = prepare(cfg, model=model, tokenizer=tokenizer, device=args.device)
    model = p.model
    rss_ready = _rss_mib()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    weights_mib = round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)
    cuda = args.device is not None and str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if cuda else None
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=next(model.parameters()).device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {
        "quantize": args.quantize,
        "device": args.device or "cpu",
        "batch": args.batch,
        "seq": args.seq,
        "gradient_checkpointing": args.checkpointing,
        "weights_mib": weights_mib,  # bytes of every parameter and buffer (quantized ones as stored)
        "rss_ready_mib": rss_ready,  # resident after prepare(), before the step
        "rss_after_step_mib": _rss_mib(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_weights_mib": round(weights / 2**20, 1) if cuda else None,
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "trainable_params": sum(q.numel() for q in params),
        "step_seconds": round(dt, 3),
        "loss": round(float(loss), 4),
    }


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _random_model(spec, quantize, device, dtype):
    """The model of `spec`'s config with random weights (shapes, hence memory, as the real one)."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import load_model, model_dir

    path = model_dir(spec) if os.path.exists(str(spec)) or spec == "default" else spec
    tmp = tempfile.mkdtemp()
    config = AutoConfig.from_pretrained(str(path))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(tmp)
    return load_model(tmp, dtype=dtype, quantize=quantize, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--config-only", action="store_true", help="random weights with the model's config")
    ap.add_argument("--quantize", default="none,8bit,4bit")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args)))
        return
    rows = []
    for q in args.quantize.split(","):
        argv = [a for a in sys.argv[1:] if not a.startswith("--quantize")]
        if "--quantize" in sys.argv:
            i = sys.argv.index("--quantize")
            argv = sys.argv[1:i] + sys.argv[i + 2 :]
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--quantize", q, "--child"], capture_output=True, text=True
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{q}: failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| quantize | weights MiB | RSS ready MiB | RSS after step MiB | peak RSS MiB | CUDA weights MiB | CUDA peak MiB | s/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['quantize']} | {r['weights_mib']} | {r['rss_ready_mib']} | {r['rss_after_step_mib']} | {r['peak_rss_mib']} | "
            f"{r['cuda_weights_mib']} | {r['cuda_peak_mib']} | {r['step_seconds']} |"
        )


if __name__ == "__main__":
    main()
