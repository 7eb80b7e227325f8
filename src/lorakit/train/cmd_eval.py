"""`lorakit eval`: loss, perplexity and (chat / prompt data) greedy exact match of a model + adapter."""

from __future__ import annotations

import json
import math


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and exact match on a data file")
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file")
    p.add_argument("--adapter", help="adapter directory to apply (none: evaluate the base)")
    p.add_argument(
        "--data", required=True, help="JSONL / CSV / Parquet file (messages, prompt/completion or text)"
    )
    p.add_argument(
        "--mode", choices=("auto", "sft", "cpt"), default="auto", help="auto: from the file's rows"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget for exact match")
    p.add_argument("--quantize", choices=("none", "4bit", "8bit"), default="none")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: loss, perplexity, exact_match, n"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import load_model
    from .evaluate import evaluate

    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} is invalid: expected a positive integer")
    model, tokenizer = load_model(
        args.model, quantize=args.quantize, device=args.device, adapter=args.adapter
    )
    dataset = load_eval_data(args.data, tokenizer, args.mode, args.max_len)
    metrics = evaluate(
        model, tokenizer, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
    )
    result = {k: metrics[k] for k in ("loss", "perplexity", "exact_match", "n")}
    if args.json:
        print(json.dumps({k: _finite(v) for k, v in result.items()}))
        return 0
    em = "n/a (text data)" if result["exact_match"] is None else f"{result['exact_match']:.3f}"
    print(f"{dataset.path}: {result['n']} examples ({dataset.format})")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  exact match {em}")
    return 0


def load_eval_data(path, tokenizer, mode: str, max_len: int):
    """load_dataset with the mode fitting the file: "text" rows are CPT, chat / prompt rows SFT."""
    from ..data import DataError, load_dataset

    if mode != "auto":
        return load_dataset(path, tokenizer, mode=mode, max_len=max_len)
    try:
        return load_dataset(path, tokenizer, mode="sft", max_len=max_len)
    except DataError as sft_error:
        try:
            return load_dataset(path, tokenizer, mode="cpt", max_len=max_len)
        except DataError:
            raise sft_error from None


def _finite(v):
    # JSON has no NaN / Infinity: a metric that is not a finite number is null.
    return None if isinstance(v, float) and not math.isfinite(v) else v
