"""Rebuilding a LoRA layer's input x in backward from tensors the base's autograd graph already keeps.

dA = s · gᵀ D(x) needs x, and a frozen Linear saves nothing of its own input, so keeping x is what LoRA adds to
training memory (per token per layer on a Llama: the input_layernorm output read by q/k/v, the
post_attention_layernorm output read by gate/up, and act(gate) · up read by down_proj). Those x are products
whose operands the base keeps anyway:

    RMSNorm (Llama, Qwen, Mistral, Phi-3, ...)   x = w · (h · rstd)          the inner mul keeps h and rstd
    RMSNorm (Gemma)                              x = ((h · rstd) · (1 + w))  cast to the model dtype
    gated MLP                                    x = act(gate) · up          the mul keeps both operands

so the Function keeps references to those same tensors (no new memory: they live until the producer's own
backward, which runs after the LoRA layer's) and recomputes x with the very same elementwise ops: the rebuilt x
is bitwise the x of forward, and the gradients are the ones of saving x.

`source(x)` reads x's producer (x.grad_fn) and returns a plan, or None when the producer is not recognised:
only MulBackward0 nodes (both operands saved, or one saved and the other itself such a product) and dtype
casts, at most `MAX_DEPTH` deep, all on x's device, whose rebuilt shape and dtype are x's. None also when
saved-tensor hooks are active (activation checkpointing, offloading): reading the producer's saved tensors in
forward would unpack them there, and under checkpointing x is recomputed anyway. The caller then saves x.
A layer's `recompute_input` (default True; `set_recompute(model, False)` turns it off) says whether to try.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_DEPTH = 3
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# A plan is a nested tuple: ("t", i) the i-th kept tensor; ("mul", a, b); ("to", dtype, a).
Plan = tuple


def source(x: Tensor) -> tuple[Plan, tuple[Tensor, ...]] | None:
    """(plan, the tensors it reads) that rebuild x exactly, or None (see the module docstring)."""
    node = x.grad_fn
    if node is None or _hooks_active():
        return None
    kept: list[Tensor] = []
    try:
        plan = _walk(node, x.dtype, kept, MAX_DEPTH)
    except RuntimeError:  # a saved operand was modified in place since: it cannot be read
        return None
    if plan is None or any(t.device != x.device for t in kept):
        return None
    meta = _meta(plan, kept)
    if meta is None or meta != (tuple(x.shape), x.dtype):
        return None
    return plan, tuple(kept)


def rebuild(plan: Plan, kept: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """Evaluate a plan of `source` on its tensors (in backward)."""
    op = plan[0]
    if op == "t":
        return kept[plan[1]]
    if op == "to":
        return rebuild(plan[2], kept).to(plan[1])
    return rebuild(plan[1], kept) * rebuild(plan[2], kept)


def set_recompute(model: torch.nn.Module, on: bool) -> None:
    """Whether the Lora layers of `model` rebuild their input in backward (True, the default) or save it."""
    from ..adapters import lora_layers

    for _, layer in lora_layers(model):
        layer.recompute_input = bool(on)


def _hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _walk(node, dtype: torch.dtype | None, kept: list[Tensor], depth: int) -> Plan | None:
    """The plan computing `node`'s output (of `dtype` when known, else None), or None if unrecognised."""
    name = type(node).__name__
    if name == "ToCopyBackward0":
        child, nr = node.next_functions[0]
        if dtype is None or child is None or nr != 0 or depth == 0:
            return None
        inner = _walk(child, None, kept, depth - 1)
        return None if inner is None else ("to", dtype, inner)
    if name != "MulBackward0":
        return None
    a, b = node._saved_self, node._saved_other
    if a is None and b is None:
        return None
    plans: list[Plan | None] = [None, None]
    for i, t in enumerate((a, b)):
        if t is not None:
            kept.append(t)
            plans[i] = ("t", len(kept) - 1)
    for i, t in enumerate((a, b)):
        if t is None:  # not saved: the operand is itself a product (or a cast of one)
            child, nr = node.next_functions[i]
            other = b if i == 0 else a
            if child is None or nr != 0 or depth == 0:
                return None
            want = _cast_target(child, other, dtype)
            plans[i] = _walk(child, want, kept, depth - 1)
            if plans[i] is None:
                return None
    return ("mul", plans[0], plans[1])


def _cast_target(child, other: Tensor, out_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a cast `child` must produce for `cast · other` to have `out_dtype`: the one float dtype that
    fits, else None (ambiguous or unknown: a cast there is then not rebuilt)."""
    if type(child).__name__ != "ToCopyBackward0" or out_dtype is None:
        return None
    probe = torch.empty(() if other.dim() == 0 else (1,), dtype=other.dtype, device="meta")
    fits = [
        d for d in _FLOATS if torch.result_type(torch.empty(1, dtype=d, device="meta"), probe) == out_dtype
    ]
    return fits[0] if len(fits) == 1 else None


def _meta(plan: Plan, kept: list[Tensor]) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of the plan's result, without touching data: broadcasting and type promotion computed
    on the shapes in Python (meta tensors and torch.broadcast_shapes made `source` take ~40 µs per RMSNorm
    input, in every forward; now ~12), meta tensors only for a 0-dim operand beside a dimensioned one."""
    try:
        return _meta_t(plan, kept)
    except RuntimeError:  # shapes that do not broadcast: not what the producer computed
        return None


def _meta_t(plan: Plan, kept: list[Tensor]):
    op = plan[0]
    if op == "t":
        t = kept[plan[1]]
        return tuple(t.shape), t.dtype
    if op == "to":
        shape, _ = _meta_t(plan[2], kept)
        return shape, plan[1]
    (sa, da), (sb, db) = _meta_t(plan[1], kept), _meta_t(plan[2], kept)
    if (len(sa) == 0) == (len(sb) == 0):
        dtype = torch.promote_types(da, db)
    else:  # a 0-dim tensor takes part in promotion only across categories: let torch decide
        dtype = torch.result_type(
            torch.empty(sa, dtype=da, device="meta"), torch.empty(sb, dtype=db, device="meta")
        )
    return _broadcast(sa, sb), dtype


def _broadcast(sa: tuple[int, ...], sb: tuple[int, ...]) -> tuple[int, ...]:
    """torch.broadcast_shapes for two shapes; RuntimeError if they do not broadcast."""
    n = max(len(sa), len(sb))
    a, b = (1,) * (n - len(sa)) + sa, (1,) * (n - len(sb)) + sb
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise RuntimeError(f"shapes {sa} and {sb} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(out)
