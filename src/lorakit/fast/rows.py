"""Per-row adapters (a mixed batch: row i uses its own adapter or none) on a Linear-like layer, no grad, from
the layer's slots (slots.LayerSlots: every resident adapter's factors, written when it loads) and the step's
mapping (rowmapping.RowMapping: which slot each row uses). Nothing is built, cached or checked here.

At decode sizes (at most STACK_TOKENS tokens in the call) the number of small ops counts, so every slot runs
as one batched pair (functional.grouped_lora_into_): the rows gathered by slot (one index_select; a slot's
spare places, up to the fullest slot's row count, repeat a row and are masked), u_s = A_s x_sᵀ and
y_s += u_s (s·B_s)ᵀ as two bmm over the slots' own blocks of the stacks, added back with one index_add_.
When the rows are in slot order already, every used slot with the same number of rows (the serving engine
sorts its rows by slot), the pair runs on views of x and y: nothing gathered, masked or scattered.
Each row meets its own slot alone: multiplying every row by every slot and masking the columns (the
previous path) did `used` times the arithmetic, and at batch 16 on a CPU these matmuls are bound by
arithmetic, not by reading the factors (SmolLM2-135M shapes, 8 slots of r = 16, 210 layers, 1 thread:
~19 ms a step vs ~32 ms). Above that, and at any size when the step's rows use one adapter (the grouped pair
would read every slot below its own), each adapter's rows are taken as contiguous runs (views, no copy): one
matmul and one addmm_ per run, the same work as a single adapter over the batch when each adapter's rows are
together (the serving engine keeps them in slot order); rows scattered over more than MAX_RUNS runs are
gathered with index_select and written back with index_copy_.

Where lorakit's native CPU kernel is loaded (fast/native: `lorakit serve` loads it at start-up), the pair is
one C++ call per layer instead of the two bmm (CPU, float32; the same math, tested against it).

DoRA slots also rescale their rows' base output by m / ||W + ΔW|| (functional.dora_rescale_base_), a factor
the slot holds beside its factors (ratio - 1; zero for plain LoRA slots and rows without an adapter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as LF
from . import enabled, native

MAX_RUNS = 2  # above this many runs for one adapter, one gather + one scatter beat many tiny matmuls
STACK_TOKENS = 256  # at or below this many tokens, the grouped pair beats one pair per adapter


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

    slots: the layer's slots.LayerSlots. mapping: the step's rowmapping.RowMapping (groups, runs, slot_rows,
    slot_groups). bias: the layer's bias (DoRA rescales the base output without it).
    """
    # One adapter in the step: its own factors alone (its slot may sit above others the grouped pair would read).
    if len(mapping.groups) > 1 and x.dim() >= 2 and x.numel() // x.shape[-1] <= STACK_TOKENS:
        return _grouped_(y, x, slots, mapping, bias)
    for name, rows in mapping.groups.items():
        i = mapping.slot_of[name]
        if slots.ranks[i] == 0:
            continue  # this adapter has nothing on this layer
        A, B, factor = slots.slot(i)
        runs = mapping.runs[name]
        if runs == [(0, x.shape[0])]:  # every row (one adapter over the batch): no slicing
            _add_one_(y, x, A, B, factor, bias)
        elif len(runs) <= MAX_RUNS:
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


def _grouped_(y: Tensor, x: Tensor, slots, mapping, bias: Tensor | None) -> Tensor:
    """y += each row's slot delta, every slot in one batched pair (functional.grouped_lora_into_ over the
    prefix's (used, rmax, ·) blocks, views made with the stacks: no factor copied or viewed here); see the
    module docstring."""
    factor = slots.row_factor
    if factor is not None:
        factor = factor.index_select(0, mapping.slot_rows_on(factor.device))
        LF.dora_rescale_base_(y.view(x.shape[0], -1, y.shape[-1]), factor.unsqueeze(1), bias)
    index, pad = mapping.slot_groups(*slots.kind)
    if index is None:  # rows in place order: slot s is rows [s·P, (s + 1)·P), views of x and y
        rows = slots.used * mapping.width  # (base rows after them)
        _pair_(y[:rows], x[:rows], slots, None, None, mapping.width)
    else:
        _pair_(y, x, slots, index, pad, mapping.width)
    return y


_NONE = {torch.float32: torch.empty(0), torch.long: torch.empty(0, dtype=torch.long)}


def _pair_(y: Tensor, x: Tensor, slots, index: Tensor | None, pad: Tensor | None, width: int) -> None:
    """The grouped pair over the prefix's blocks: lorakit's native kernel (fast/native) where it is loaded and
    applies (CPU, float32, r <= 256), else functional.grouped_lora_into_ (the same math, tested against it)."""
    A, sB = slots.A3, slots.sB3
    if (
        native.loaded()
        and enabled()
        and not torch.compiler.is_compiling()  # (an opaque C++ call: compiled graphs keep the eager pair)
        and A.dtype == x.dtype == y.dtype == torch.float32
        and A.device.type == "cpu"
        and A.shape[1] <= 256
        and x.is_contiguous()
        and y.is_contiguous()
    ):
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        native.grouped_lora_(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), A, sB,
                             _NONE[torch.long] if index is None else index,
                             _NONE[torch.float32] if pad is None else pad.view(-1), width, tokens)  # fmt: skip
    else:
        LF.grouped_lora_into_(y, x, A, sB, index, pad)
