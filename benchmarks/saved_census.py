"""Where training activation memory goes: a census of the tensors autograd keeps for backward, by producer.

    python benchmarks/saved_census.py                      # SmolLM2-135M shape, batch 4x256, base / lorakit / PEFT
    python benchmarks/saved_census.py --layers 2 --no-peft # quick

After one forward (the loss, before backward) the autograd graph is walked from the loss; every tensor a node
keeps (`_saved_*` of built-in nodes, `saved_tensors` of custom Functions) is counted once per storage, under
the first node found holding it; parameters are left out (they are not activations). Prints MB by node type and
the total for each configuration, so "what does LoRA add on top of the frozen base" is read directly.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from bench_lora import base_model, with_adapters  # noqa: E402


def _saved(node) -> list:
    if hasattr(node, "saved_tensors"):  # a custom autograd.Function's node is its ctx
        try:
            return list(node.saved_tensors)
        except RuntimeError:
            return []
    out = []
    for a in dir(node):
        if a.startswith("_saved_"):
            v = getattr(node, a)
            out += v if isinstance(v, (list, tuple)) else [v]
    return out


def census(loss: torch.Tensor, params: set[int]) -> dict[str, float]:
    """MB of distinct saved storages (parameters excluded) by the name of a node holding them: a storage that
    a LoRA node (a custom Function, or PEFT's lora_ matmuls: not told apart here) shares with a base node is
    counted under the base node, so the LoRA rows show only what LoRA alone keeps."""
    seen_nodes, owners, size = set(), defaultdict(set), {}
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for t in _saved(node):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in params:
                continue
            key = t.untyped_storage().data_ptr()
            owners[key].add(type(node).__name__)
            size[key] = t.untyped_storage().nbytes() / 2**20
        stack += [f for f, _ in node.next_functions]
    by = defaultdict(float)
    for key, names in owners.items():
        base = sorted(n for n in names if "Lora" not in n)
        by[base[0] if base else sorted(names)[0]] += size[key]
    return dict(by)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    args.device, args.dtype = "cpu", "fp32"
    from lorakit.losses import causal_lm_loss

    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    totals = {}
    for lib in ("base", "lorakit") + (() if args.no_peft else ("peft",)):
        model = with_adapters(base_model(args), lib, args.dropout)
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        loss, _ = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
        by = census(loss, params)
        totals[lib] = sum(by.values())
        print(f"\n{lib}: {totals[lib]:.1f} MB saved for backward")
        for name, mb in sorted(by.items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {name:<52}{mb:>9.1f}")
        del loss, model
    for lib in totals:
        if lib != "base":
            print(f"{lib} - base: {totals[lib] - totals['base']:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
