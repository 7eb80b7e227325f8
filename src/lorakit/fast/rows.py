"""Per-row adapters (a mixed batch: row i uses adapter names[i] or none) for Linear-like layers.

Under no_grad, each adapter's rows are taken as contiguous runs (views, no copy) and its delta is added into
the base output in place: one matmul and one addmm_ per run. A batch sorted by adapter (what a server should
send) therefore costs one (x Aᵀ, addmm_) pair per adapter, the same work as a single adapter over the whole
batch. Rows scattered over many runs are gathered with index_select and added back with index_add_ instead.
With gradients on, the out-of-place path of the plain layer is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import add_lora_inplace

MAX_RUNS = 2  # above this many runs for one adapter, one gather + one scatter beat many tiny matmuls


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
