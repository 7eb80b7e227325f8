"""`lorakit inspect | resize | combine | convert`: thin argparse wrappers over lorakit.tools."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    """Add the adapter tools' subcommands to the `lorakit` parser's subparsers."""
    p = sub.add_parser("inspect", help="show what an adapter holds (ranks, alphas, sizes, ΔW spectrum)")
    p.add_argument("dir", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--spectrum", action="store_true", help="singular values of each ΔW and a suggested rank")
    p.add_argument("--energy", type=float, default=0.9, help="energy share the suggested rank keeps (0.9)")
    p.add_argument("--plot", metavar="PNG", help="write the energy-vs-rank plot here (implies --spectrum)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("resize", help="truncate every ΔW to its best rank-K approximation (SVD)")
    p.add_argument("dir")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="the new rank K (capped at each module's current rank)")
    group.add_argument(
        "--energy", type=float, help="per module, the smallest rank keeping this share of ‖ΔW‖²"
    )
    _output_args(p)
    p.set_defaults(func=_resize)

    p = sub.add_parser("combine", help="weighted sum of adapters: exact (cat), best rank-K (svd) or linear")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument(
        "--weights", type=float, nargs="+", help="one weight per adapter, any sign (default 1 each)"
    )
    p.add_argument("--method", choices=("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"),
                   default="cat", help="cat: exact, rank Σrᵢ; svd: best rank-K of the sum; linear: equal ranks, "
                   "approximate; ties / dare_linear / dare_ties / magnitude_prune: element-wise merges of the ΔWᵢ "
                   "(PEFT's *_svd combination types), then best rank-K")  # fmt: skip
    p.add_argument("--rank", type=int, help="the rank K of --method svd (and of ties / dare / magnitude_prune: "
                   "default the largest input rank)")  # fmt: skip
    p.add_argument("--density", type=float, default=0.5,
                   help="ties / dare / magnitude_prune: the fraction of ΔW entries kept (default 0.5)")  # fmt: skip
    p.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                   help="ties / dare_ties: elect each entry's sign by summed values or by votes (default total)")  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, help="dare_*: the seed of the random drop masks (default 0)"
    )
    p.add_argument("--force", action="store_true", help="combine adapters with different base fingerprints")
    _output_args(p)
    p.set_defaults(func=_combine)

    p = sub.add_parser("convert", help="cast an adapter's tensors to bf16 / fp16 (half the file) or fp32")
    p.add_argument("dir")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), required=True)
    _output_args(p)
    p.set_defaults(func=_convert)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, help="directory of the new adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")
    p.add_argument("--json", action="store_true", help="print the per-module report as JSON")


def _inspect(args) -> int:
    from .inspect import format_info, inspect_adapter, plot_spectrum

    info = inspect_adapter(args.dir, spectrum=args.spectrum or bool(args.plot), energy=args.energy)
    if args.plot:
        plot_spectrum(info, args.plot)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return 0


def _resize(args) -> int:
    from .resize import resize

    rep = resize(args.dir, args.output, rank=args.rank, energy=args.energy, overwrite=args.overwrite)
    rows = [(r.name, f"{r.rank_before} -> {r.rank_after}", r.rel_error) for r in rep.modules]
    _report(args, rows, [vars(r) for r in rep.modules], rep.notes)
    return 0


def _combine(args) -> int:
    from .combine import combine

    rep = combine(args.dirs, args.output, weights=args.weights, method=args.method, rank=args.rank,
                  force=args.force, overwrite=args.overwrite, density=args.density,
                  majority_sign=args.majority_sign, seed=args.seed)  # fmt: skip
    rows = [(r.name, str(r.rank), r.rel_error) for r in rep.modules]
    _report(args, rows, [vars(r) for r in rep.modules], rep.notes)
    return 0


def _convert(args) -> int:
    from .convert import convert

    rep = convert(args.dir, args.output, args.dtype, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"output": args.output, **vars(rep)}, indent=2))
    else:
        print(
            f"wrote {args.output}: {rep.bytes_before / 1e6:.2f} MB -> {rep.bytes_after / 1e6:.2f} MB "
            f"({args.dtype}); max relative rounding error {rep.max_rel_error:.2e}"
        )
    return 0


def _report(args, rows: list[tuple[str, str, float]], as_json: list[dict], notes: list[str]) -> None:
    if args.json:
        print(json.dumps({"output": args.output, "modules": as_json, "notes": notes}, indent=2))
        return
    width = max(len(r[0]) for r in rows)
    print(f"{'module':<{width}}  {'rank':>8}  rel. error ‖ΔW' - ΔW‖/‖ΔW‖")
    for name, rank, err in rows:
        print(f"{name:<{width}}  {rank:>8}  {err:.4f}")
    errs = [r[2] for r in rows]
    print(f"wrote {args.output}: {len(rows)} modules, relative error max {max(errs):.4f}, "
          f"mean {sum(errs) / len(errs):.4f}")  # fmt: skip
    for note in notes:
        print(f"note: {note}")
