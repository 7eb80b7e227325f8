"""Per-row adapters (a mixed batch: row i uses its own adapter or none) on a Linear-like layer, no grad, from
the layer's slots (slots.LayerSlots: every resident adapter's factors, written when it loads) and the step's
mapping (slots.RowMapping: which slot each row uses). Nothing is built, cached or checked here.

At decode sizes (at most STACK_TOKENS tokens in the call) the cost is the number of small ops, not their
arithmetic, so every slot runs as one pair: u = x [A₁; …; A_S]ᵀ (every row against every slot), u ⊙ column
mask (a row keeps only its slot's columns), y += u [s₁B₁ … s_SB_S]ᵀ. Above that, and at any size when the
step's rows use one adapter (the stack would read every slot below its own), each adapter's rows are
taken as contiguous runs (views, no copy): one matmul and one addmm_ per run, the same work as a single
adapter over the batch when rows are sorted by adapter (what a server should send); rows scattered over
more than MAX_RUNS runs are gathered with index_select and written back with index_copy_.

DoRA slots also rescale their rows' base output by m / ||W + ΔW|| (functional.dora_rescale_base_), a factor
the slot holds beside its factors (ratio - 1; zero for plain LoRA slots and rows without an adapter).
"""

from __future__ import annotations

from torch import Tensor

from .. import functional as LF

MAX_RUNS = 2  # above this many runs for one adapter, one gather + one scatter beat many tiny matmuls
STACK_TOKENS = 256  # at or below this many tokens, the stacked pair beats one pair per adapter


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices -> maximal contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for r in sorted(rows):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def add_rows_(y: Tensor, x: Tensor, slots, mapping, bias: Tensor | None) -> Tensor:
    """y (the base output for x, (batch, ..., out)) plus each row's adapter, in place; returns y.

    slots: the layer's slots.LayerSlots. mapping: the step's slots.RowMapping (groups, runs, slot_rows,
    column masks). bias: the layer's bias (DoRA rescales the base output without it).
    """
    # One adapter in the step: its own factors alone (its slot may sit above others the stack would read).
    if len(mapping.groups) > 1 and x.dim() >= 2 and x.numel() // x.shape[-1] <= STACK_TOKENS:
        return _stacked_(y, x, slots, mapping, bias)
    for name, rows in mapping.groups.items():
        i = mapping.slot_of[name]
        if slots.ranks[i] == 0:
            continue  # this adapter has nothing on this layer
        A, B, factor = slots.slot(i)
        runs = mapping.runs[name]
        if len(runs) <= MAX_RUNS:
            for a, b in runs:
                _add_one_(y[a:b], x[a:b], A, B, factor, bias)
        else:
            ys = y.index_select(0, rows)
            _add_one_(ys, x.index_select(0, rows), A, B, factor, bias)
            y.index_copy_(0, rows, ys)
    return y


def _add_one_(y: Tensor, x: Tensor, A: Tensor, B: Tensor, factor: Tensor | None, bias: Tensor | None) -> None:
    if factor is not None:
        LF.dora_rescale_base_(y, factor, bias)
    LF.lora_into_(y, x, A, B)


def _stacked_(y: Tensor, x: Tensor, slots, mapping, bias: Tensor | None) -> Tensor:
    """y += each row's slot delta, every slot in one (matmul, column mask, addmm_); see the module docstring."""
    batch = x.shape[0]
    if slots.row_factor is not None:
        factor = slots.row_factor.index_select(0, mapping.slot_rows_on(slots.row_factor.device))
        LF.dora_rescale_base_(y.view(batch, -1, y.shape[-1]), factor.unsqueeze(1), bias)
    mask = mapping.column_mask(slots.A.dtype, slots.A.device)  # (batch, 1, R)
    u = LF.lora_down(x, slots.A)  # (N, R)
    u.view(batch, -1, u.shape[-1]).mul_(mask)
    LF.lora_up_(y, u, slots.B)
    return y
