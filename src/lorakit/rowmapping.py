"""One step's row mapping over the per-row slots (slots.py): which slot each batch row uses, built once.

`RowSlots.mapping(names)` makes it; `per_row_adapters` puts it in place for its block (rowstate.using), and
every layer reads it there (layer_paths.RowsPath, fast/rows.py). Nothing in it changes after it is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from .fast.rows import row_runs

if TYPE_CHECKING:
    from .slots import RowSlots, SlotPrefix


class RowMapping:
    """Which slot each batch row uses, for one step: built once, read by every layer (rowstate.current()).

    groups: {name: rows (long tensor)}; runs: {name: contiguous [start, stop) runs}; slot_of: {name: slot};
    the per-row slot indices (DoRA's factors), and the slot grouping of the rows (`slot_groups`): made here
    for every dtype / device the slots use.
    slots: the step's view of the slots (`StepSlots`): only the slots up to the highest one a row uses.
    """

    def __init__(self, slots: RowSlots, names: Sequence[str | None]) -> None:
        self.slot_of: dict[str, int] = {}
        for n in names:
            if n is not None and n not in self.slot_of:
                i = slots.index_of(n)
                if i is None:
                    raise KeyError(f"adapter {n!r} is not loaded in a slot; RowSlots.load it first")
                self.slot_of[n] = i
        rows: dict[str, list[int]] = {}
        for row, n in enumerate(names):
            if n is not None:
                rows.setdefault(n, []).append(row)
        self.runs = {n: row_runs(r) for n, r in rows.items()}
        device = next((p.device for p in slots.model.parameters()), torch.device("cpu"))
        self.groups = {n: torch.tensor(r, device=device) for n, r in rows.items()}
        per_row = [slots.capacity if n is None else self.slot_of[n] for n in names]
        self.slots = StepSlots(slots, max(self.slot_of.values(), default=-1) + 1)
        by_slot = [[row for row, i in enumerate(per_row) if i == s] for s in range(self.slots.used)]
        self.width = max((len(r) for r in by_slot), default=0)  # P: rows of the fullest slot
        # Slot s's rows at [s·P, s·P + count); the rest of its P places repeat one row of the batch (its own
        # first row, else row 0): pad_mask zeroes their delta, and they are added back onto that same row.
        index = [r[k] if k < len(r) else (r[0] if r else 0) for r in by_slot for k in range(self.width)]
        pads = [[[1.0 if k < len(r) else 0.0] for k in range(self.width)] for r in by_slot]
        full = all(len(r) == self.width for r in by_slot)  # no spare place: nothing to mask
        # In place order (slot s is rows [s·P, (s + 1)·P), base rows after): the grouped pair runs on views.
        self.in_order = full and index == list(range(len(index)))
        kinds = {(s.A.dtype, s.A.device) for s in slots._layers.values()}
        self._pad_masks: dict = {}
        self._slot_rows: dict = {}
        self._group_index: dict = {}
        for dtype, dev in kinds:
            shape = (len(by_slot), self.width, 1, 1)
            self._pad_masks[(dtype, dev)] = (
                None if full else torch.tensor(pads, dtype=dtype, device=dev).view(shape)
            )
        for dev in {dev for _, dev in kinds}:  # once per device, whatever the dtypes on it
            self._slot_rows[dev] = torch.tensor(per_row, device=dev)
            self._group_index[dev] = (
                None if self.in_order else torch.tensor(index, dtype=torch.long, device=dev)
            )

    def covers(self, layer: nn.Module) -> bool:
        """Whether `layer` belongs to the model these slots serve."""
        return layer in self.slots.members

    def slot_groups(self, dtype, device) -> tuple[Tensor | None, Tensor | None]:
        """(index (used·P,), pad_mask (used, P, 1, 1)) with used = `slots.used`, P = `width`: the batch rows
        of slot s are index[s·P : s·P + count_s] (the rest pads, pad_mask 0), for the grouped path
        (fast/rows.py `_grouped_`). pad_mask None: every place is a row; index None: `in_order`, slot s's
        rows are rows [s·P, (s + 1)·P)."""
        return self._group_index[device], self._pad_masks[(dtype, device)]

    def slot_rows_on(self, device) -> Tensor:
        return self._slot_rows[device]


class StepSlots:
    """The slots as one step reads them: each layer's stacks cut to the first `used` slots
    (`LayerSlots.narrowed`; none at all when no row has an adapter), so rows pay for the slots in use up
    to the highest one, not for every slot a server preallocated. RowSlots fills the lowest free slot first."""

    def __init__(self, slots: RowSlots, used: int) -> None:
        self.members, self.used, self._slots = slots.members, used, slots

    def layer_slots(self, layer: nn.Module) -> SlotPrefix | None:
        s = self._slots.layer_slots(layer)
        return None if s is None or not self.used else s.narrowed(self.used)
