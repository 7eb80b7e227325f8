"""`lorakit merge`: base + adapter -> a plain Hugging Face model directory."""

from __future__ import annotations

from ..cli_args import add_ignore_fingerprint


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base and save a plain model directory")
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--output", required=True, help="directory to create (written atomically)")
    p.add_argument(
        "--quantize",
        choices=("none", "4bit", "8bit"),
        default="none",
        help="load the base quantized (as a QLoRA run did); it is dequantized and saved in full precision",
    )
    p.add_argument("--dtype", default="float32", help="dtype of the merge and the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_ignore_fingerprint(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export_merged

    report = export_merged(
        args.model, args.adapter, args.output, args.quantize, args.dtype, args.overwrite,
        ignore_fingerprint=args.ignore_fingerprint,
    )  # fmt: skip
    if report.dequantized:
        print(
            f"the base was quantized: dequantized it to {str(report.dtype).replace('torch.', '')}, merged, "
            "and saved in full precision"
        )
    print(f"merged model ({report.num_params:,} parameters) written to {report.output}")
    return 0
