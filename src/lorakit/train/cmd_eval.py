"""`lorakit eval`: loss, perplexity and (chat / prompt data) greedy exact match of a model + adapter.

An adapter directory written by `lorakit train` (it holds train_config.yaml) supplies the defaults of
--max-len, --mode and --chat-template, so the loss is computed as training computed it, and its system prompt
(system_prompt.txt: the one every training row shared) for the rows that have none (--system overrides).
"""

from __future__ import annotations

import json
import math
import sys

from ..cli_args import add_device, add_ignore_fingerprint

# Without a run's train_config.yaml (or for options it lacks).
FALLBACK = {"mode": "auto", "max_len": 512, "chat_template": None}


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and exact match on a data file")
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file")
    p.add_argument("--adapter", help="adapter directory to apply (none: evaluate the base)")
    p.add_argument(
        "--data", required=True, help="JSONL / CSV / Parquet file (messages, prompt/completion or text)"
    )
    p.add_argument(
        "--mode",
        choices=("auto", "sft", "cpt"),
        help="auto: from the file's rows (default: the run's, else auto)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward / generate batch (default 8)")
    p.add_argument(
        "--max-len",
        type=int,
        help="tokens per row (sft) or packed block (cpt) (default: the run's, else 512)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64,
        help="most tokens generated per row for exact match; capped at the longest reference + 16 (default 64)",
    )  # fmt: skip
    p.add_argument(
        "--chat-template", metavar="FILE|NAME", help="default: the run's saved template, else the tokenizer's"
    )
    p.add_argument(
        "--system", help="system prompt for rows without one (default: the one every training row of "
        "--adapter's run shared, if any; '' for none)",
    )  # fmt: skip
    p.add_argument("--quantize", choices=("none", "4bit", "8bit"), default="none")
    add_device(p)
    add_ignore_fingerprint(p)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: loss, perplexity, exact_match, n"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.templates import saved_template, set_chat_template
    from ..models import load_model
    from .evaluate import describe_dataset, evaluate
    from .run_defaults import fill, saved_system

    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} is invalid: expected a positive integer")
    template_given = args.chat_template is not None
    taken = fill(args, args.adapter, {"max_len": "max_len", "mode": "mode"}, FALLBACK)
    if not template_given and saved_template(args.adapter):
        args.chat_template = saved_template(args.adapter)
        taken.append("its chat template")
    if args.system is None and saved_system(args.adapter):
        args.system = saved_system(args.adapter)
        taken.append("its system prompt (for rows without one)")
    if taken and not args.json:
        print(f"from {args.adapter}/train_config.yaml: {', '.join(taken)}", file=sys.stderr)
    model, tokenizer = load_model(
        args.model, quantize=args.quantize, device=args.device, adapter=args.adapter,
        ignore_fingerprint=args.ignore_fingerprint,
    )  # fmt: skip
    set_chat_template(tokenizer, args.chat_template)
    dataset = load_eval_data(args.data, tokenizer, args.mode, args.max_len, args.system or None)
    metrics = evaluate(
        model, tokenizer, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        progress=None if args.json else sys.stderr,
    )  # fmt: skip
    result = {k: metrics[k] for k in ("loss", "perplexity", "exact_match", "n")}
    if args.json:
        print(json.dumps({k: _finite(v) for k, v in result.items()}))
        return 0
    em = "n/a (text data)" if result["exact_match"] is None else f"{result['exact_match']:.3f}"
    print(f"{dataset.path}: {describe_dataset(dataset)}")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  exact match {em}")
    return 0


def load_eval_data(path, tokenizer, mode: str, max_len: int, system: str | None = None):
    """load_dataset with the mode fitting the file: "text" rows are CPT, chat / prompt rows SFT (with `system`
    for the rows without a system prompt)."""
    from ..data import DataError, load_dataset

    if mode != "auto":
        return load_dataset(path, tokenizer, mode=mode, max_len=max_len, system=system)
    try:
        return load_dataset(path, tokenizer, mode="sft", max_len=max_len, system=system)
    except DataError as sft_error:
        try:
            return load_dataset(path, tokenizer, mode="cpt", max_len=max_len)
        except DataError:
            raise sft_error from None


def _finite(v):
    # JSON has no NaN / Infinity: a metric that is not a finite number is null.
    return None if isinstance(v, float) and not math.isfinite(v) else v
