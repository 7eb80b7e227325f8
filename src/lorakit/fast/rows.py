"""Per-row adapters (a mixed batch: row i uses adapter names[i] or none) for Linear-like layers.

Under no_grad, each adapter's rows are taken as contiguous runs (views, no copy) and its delta is added into
the base output in place: one matmul and one addmm_ per run. A batch sorted by adapter (what a server should
send) therefore costs one (x Aᵀ, addmm_) pair per adapter, the same work as a single adapter over the whole
batch. Rows scattered over many runs are gathered with index_select and added back with index_add_ instead.
With gradients on, the out-of-place path of the plain layer is used.

At decode sizes (at most STACK_TOKENS tokens in the call) the cost is the number of small ops, not their
arithmetic, so all of the plan's adapters on a layer run as one pair instead: u = x [A₁; …; A_k]ᵀ (every row
against every adapter, k·r columns), u ⊙ row-mask (a row keeps only its adapter's columns), y += u [s₁B₁ … s_kB_k]ᵀ.
The stacked factors are built on a layer's second such call inside one `per_row_adapters` context, or on the
first when STACK_AT_ONCE or more adapters meet on the layer (a server enters one context per decode step), and
dropped with the plan when it exits:
they hold the adapter weights as they were then (inference only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import add_lora_inplace

MAX_RUNS = 2  # above this many runs for one adapter, one gather + one scatter beat many tiny matmuls
STACK_TOKENS = 256  # at or below this many tokens, the stacked pair beats one pair per adapter
ROW_STACK_ATTR = "_lorakit_row_stack"  # where a layer keeps its last stacked factors (see _stacked_factors)
STACK_AT_ONCE = 3  # adapters on a layer from which stacking pays even for a single call


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices -> maximal contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for r in sorted(rows):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def forward_rows(layer, x: Tensor, y: Tensor) -> Tensor:
    """y (the base output for x) plus, on each row, that row's adapter delta. Raises on DoRA adapters."""
    from ..layers import LinearLike

    plan = layer.row_plan
    inplace = isinstance(layer, LinearLike) and not torch.is_grad_enabled()
    if inplace and x.dim() >= 2 and x.numel() // x.shape[-1] <= STACK_TOKENS:
        key = (id(layer), x.shape[0])
        if key in plan.stacks:  # a second decode-sized call in this context: stacking pays from now on
            return _stacked(layer, plan, key, x, y)
        plan.stacks[key] = False
        # Building the stack is ~4 small ops; the runs cost 2 per adapter. With STACK_AT_ONCE adapters or more
        # it pays on the first call (a server enters one context per decode step); with fewer, the first call
        # takes runs, so a context held for a single call with one or two adapters builds nothing.
        if sum(n in layer.lora for n in plan.groups) >= STACK_AT_ONCE:
            return _stacked(layer, plan, key, x, y)
    for name, rows in plan.groups.items():
        if name not in layer.lora:
            continue
        w = layer.lora[name]
        if w.magnitude is not None:
            raise RuntimeError("per-row adapters do not support DoRA adapters")
        runs = plan.runs[name]
        if inplace and len(runs) <= MAX_RUNS:
            for a, b in runs:
                add_lora_inplace(y[a:b], x[a:b], [w])
        elif inplace:
            xs = x.index_select(0, rows)
            d = add_lora_inplace(
                torch.zeros(*xs.shape[:-1], y.shape[-1], dtype=y.dtype, device=y.device), xs, [w]
            )
            y.index_add_(0, rows, d)
        else:
            d = layer._branch(w, x.index_select(0, rows), None)
            y = y.index_add(0, rows, d.to(y.dtype))
    return y


def _stacked(layer, plan, key, x: Tensor, y: Tensor) -> Tensor:
    """y += each row's adapter delta, all adapters in one (matmul, mask, addmm_); see the module docstring."""
    st = plan.stacks[key]
    if st is False:
        st = plan.stacks[key] = _build_stack(layer, plan, x.shape[0])
    if st is None:
        return y
    A, BT, mask = st
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    u = (x3 if x3.dtype == A.dtype else x3.to(A.dtype)) @ A.t()  # (batch, tokens, R)
    u.mul_(mask)
    y2 = y.view(-1, y.shape[-1])
    if y.dtype == A.dtype:
        y2.addmm_(u.view(-1, u.shape[-1]), BT)
    else:
        y2.add_((u.view(-1, u.shape[-1]) @ BT).to(y.dtype))
    return y


def _build_stack(layer, plan, batch: int):
    """(A stacked (R, in), (s·B)ᵀ stacked (R, out), row mask (batch, 1, R)) for this layer, or None."""
    names = tuple(n for n in plan.groups if n in layer.lora)
    if not names:
        return None
    ws = [layer.lora[n] for n in names]
    if any(w.magnitude is not None for w in ws):
        raise RuntimeError("per-row adapters do not support DoRA adapters")
    dtype, device, R = ws[0].A.dtype, ws[0].A.device, sum(w.r for w in ws)  # R = Σ r_k
    # The mask and the column scales depend only on (names, ranks, scales): shared by the plan's layers.
    shape_key = (names, tuple(w.r for w in ws), tuple(w.scale for w in ws), batch, dtype, device)
    shared = plan.stacks.get(shape_key)
    if shared is None:
        mask = torch.zeros(batch, 1, R, dtype=dtype)
        scales = torch.empty(R, 1, dtype=dtype)
        col = 0
        for n, w in zip(names, ws):
            mask[plan.groups[n].cpu(), :, col : col + w.r] = 1
            scales[col : col + w.r] = w.scale
            col += w.r
        shared = plan.stacks[shape_key] = (mask.to(device), scales.to(device))
    mask, scales = shared
    return *_stacked_factors(layer, names, ws, scales), mask


def _stacked_factors(layer, names: tuple, ws: list, scales: Tensor) -> tuple[Tensor, Tensor]:
    """(A stacked, (s·B)ᵀ stacked) for `names` on `layer`, kept on the layer between `per_row_adapters`
    contexts: a server enters one per decode step and would otherwise rebuild every stack every step.

    The kept pair is reused only while every factor is the very same tensor, at the same storage and version
    (an optimizer step, a load or a `.to()` changes one of those) with the same scale; else it is rebuilt.
    Only the last pair per layer is kept, so it costs at most one copy of the adapters in use.
    """
    # Inference tensors keep no version counter, so an in-place change to one could not be seen: never kept.
    keep = not any(w.A.is_inference() or w.B.is_inference() for w in ws)
    if keep:
        key = tuple(
            (w.A, w.A._version, w.A.data_ptr(), w.B, w.B._version, w.B.data_ptr(), w.scale) for w in ws
        )
        kept = layer.__dict__.get(ROW_STACK_ATTR)
        if kept is not None and kept[0] == names and _same(kept[1], key):
            return kept[2], kept[3]
    A = torch.cat([w.A for w in ws])  # (R, in)
    B = torch.cat([w.B for w in ws], dim=1).t().mul_(scales)  # (s·B)ᵀ (R, out), row k scaled by its s
    if keep:
        layer.__dict__[ROW_STACK_ATTR] = (names, key, A, B)  # not a registered buffer: never saved or moved
    return A, B


def _same(a: tuple, b: tuple) -> bool:
    # `is` for the tensors (== would compare values elementwise), == for versions, pointers and scales.
    return len(a) == len(b) and all(
        x[0] is y[0] and x[3] is y[3] and x[1:3] == y[1:3] and x[4:] == y[4:] for x, y in zip(a, b)
    )
