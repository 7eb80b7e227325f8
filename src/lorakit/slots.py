"""Per-row serving state, explicit: slots written when an adapter loads or leaves, one mapping per step.

    slots = lorakit.RowSlots(model, capacity=8)   # attached to the model; per_row_adapters uses it
    i = slots.load("a")                           # write adapter "a" into a free slot (vLLM's set_lora)
    slots.evict("a")                              # free it (vLLM's reset_lora)
    with lorakit.per_row_adapters(model, ["a", None, "b"]): model(batch)   # one RowMapping for the step

Each Linear-like layer gets preallocated stacks (`LayerSlots`): A (S·rmax, in) and s·B (out, S·rmax), slot i
in columns [i·rmax, i·rmax + rᵢ) (zero elsewhere), so one grouping of the rows by slot per step (`RowMapping`,
rowmapping.py) serves every layer. A slot holds a *copy* of the adapter's factors as they were at `load`: call
`load` again after changing them (training, an in-place edit). `delete_adapter` evicts a deleted adapter; adding
adapters keeps slots valid.

A server writes adapters that are not on the model at all (`write`, with a `SlotContent` built once when the
adapter is registered: serve/resident.py): their factors go straight into the stacks and the few per-module
records per-row serving reads (trainable tokens, a modules_to_save copy, LoRA on a non-Linear layer) are
put on their (already wrapped) modules; `evict` takes them off again. No module is wrapped, no weight
fingerprinted and no adapter record made per load.

Without attached slots, `per_row_adapters` writes temporary slots for its own `with` block (fresh every
time: always current, but a server should attach slots once and pay the copy only at load).

Per row, everything an adapter carries applies: LoRA and DoRA factors (slots), trainable tokens and
modules_to_save copies (their rows of the batch, from the adapter's own tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from . import rowstate
from .adapters import adapter_layers, adapter_records, get_adapter, link_fused, lora_layers, replace_module
from .layers import LinearLike, LoraLayer, adapter_dtype, unwrap, wrap
from .rowmapping import RowMapping
from .saved import SavedModule, unwrap_saved, wrap_saved

SLOTS_ATTR = "lorakit_slots"  # where a model keeps its attached RowSlots (model.__dict__)


class LayerSlots:
    """One layer's stacked slots. A (S·rmax, in), B (out, S·rmax; a transposed view of (S·rmax, out)
    storage) with each slot's scale folded in, ranks (S,)
    (0: empty, or the adapter has nothing on this layer), row_factor (S + 1, out) DoRA's ratio - 1 per slot
    (row S: rows without an adapter) or None while no DoRA adapter is resident."""

    def __init__(self, capacity: int, rmax: int, d_in: int, d_out: int, dtype, device) -> None:
        self.rmax = rmax
        self.A = torch.zeros(capacity * rmax, d_in, dtype=dtype, device=device)
        # Stored as (S·rmax, out), seen as (out, S·rmax): one slot's s·B_iᵀ is then rows [c, c + r) of the
        # storage, contiguous, where a column slice of a row-major (out, S·rmax) would touch one cache line per
        # output row (measured cold, 1536 × 16 of 8 slots: 35-70 µs for the up-projection vs 50-140 µs).
        self.B = torch.zeros(capacity * rmax, d_out, dtype=dtype, device=device).t()
        self.ranks = [0] * capacity
        self.row_factor: Tensor | None = None
        self.rescaled = [False] * capacity  # slot i has a DoRA factor
        # slot(i)'s views, made when slot i is written (a step asks for them on every layer: slicing there
        # cost ~2 ms a decode step on a 210-layer model, a fifth of one adapter's extra time)
        self._slots: list[tuple[Tensor, Tensor, Tensor | None] | None] = [None] * capacity
        # narrowed(used) for every used: views made with the stacks (writes are in place, so they stay valid;
        # what changes per write, ranks and DoRA factors, a prefix reads from here when asked).
        self._prefixes = [SlotPrefix(self, used) for used in range(1, capacity + 1)]

    def write(self, i: int, A: Tensor, sB: Tensor, factor: Tensor | None) -> None:
        """Slot i := (A (r, in), s·B (out, r), DoRA factor (out,) or None). r <= rmax."""
        self.reset(i)  # (a no-op on an empty slot, which is all zeros)
        c, r = i * self.rmax, A.shape[0]
        self.A[c : c + r].copy_(A)
        self.B[:, c : c + r].copy_(sB)
        self.ranks[i] = r
        if factor is not None:
            if self.row_factor is None:
                self.row_factor = self.A.new_zeros(len(self.ranks) + 1, self.B.shape[0])
            self.row_factor[i].copy_(factor)
            self.rescaled[i] = True
        self._slots[i] = self._slice(i)

    def _slice(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        c, r = i * self.rmax, self.ranks[i]
        factor = self.row_factor[i] if self.rescaled[i] else None
        return self.A[c : c + r], self.B[:, c : c + r], factor

    def reset(self, i: int) -> None:
        """Slot i := empty. Only its first ranks[i] columns can be non-zero (write keeps the rest zero)."""
        if not self.ranks[i] and not self.rescaled[i]:
            return
        c = i * self.rmax
        self.A[c : c + self.ranks[i]].zero_()
        self.B[:, c : c + self.ranks[i]].zero_()
        self.ranks[i] = 0
        self.rescaled[i] = False
        self._slots[i] = None
        if self.row_factor is not None:
            self.row_factor[i].zero_()

    def slot(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(A_i (r, in), s·B_i (out, r), DoRA factor (out,) or None): views of slot i, made when it was written
        (an empty slot: (0, in) and (out, 0) views, no factor)."""
        views = self._slots[i]
        return views if views is not None else self._slice(i)

    def narrowed(self, used: int) -> SlotPrefix:
        """The first `used` (1..capacity) slots alone, as views made with the stacks (nothing is built here), so a
        step whose rows use no slot past them multiplies by none of the others."""
        return self._prefixes[used - 1]

    def resized(self, capacity: int, rmax: int) -> LayerSlots:
        """A copy with `capacity` >= len(ranks) slots of room for rank `rmax` >= self.rmax (same contents)."""
        new = LayerSlots(capacity, rmax, self.A.shape[1], self.B.shape[0], self.A.dtype, self.A.device)
        for i, r in enumerate(self.ranks):
            c = i * self.rmax
            new.A[i * rmax : i * rmax + r].copy_(self.A[c : c + r])
            new.B[:, i * rmax : i * rmax + r].copy_(self.B[:, c : c + r])
        grow = capacity - len(self.ranks)
        new.ranks, new.rescaled = list(self.ranks) + [0] * grow, list(self.rescaled) + [False] * grow
        if self.row_factor is not None:  # row S (rows without an adapter) stays last
            new.row_factor = self.row_factor.new_zeros(capacity + 1, self.row_factor.shape[1])
            new.row_factor[: len(self.ranks)].copy_(self.row_factor[:-1])
        new._slots = [new._slice(i) if view is not None else None for i, view in enumerate(self._slots)]
        new._slots += [None] * grow
        return new


class SlotPrefix:
    """Slots 0..used-1 of a LayerSlots, as a step's grouped pair reads them (fast/rows.py).

    A (used·rmax, in) and B (out, used·rmax): views of the stacks; A3 (used, rmax, in) and sB3 (used, rmax,
    out): the same storage as one (rmax, ·) block per slot, the operands of functional.grouped_lora_into_;
    kind: (dtype, device) of the stacks.
    Made once with the stacks (a view per op costs ~1-2 µs, 210 layers a step); ranks, DoRA's row_factor and
    slot(i) are read from the stacks when asked, so writes and resets need not touch any prefix.
    """

    def __init__(self, stacks: LayerSlots, used: int) -> None:
        self.stacks, self.used = stacks, used
        n = used * stacks.rmax
        self.A, self.B = stacks.A[:n], stacks.B[:, :n]
        self.A3 = self.A.view(used, stacks.rmax, stacks.A.shape[1])
        self.sB3 = self.B.t().view(used, stacks.rmax, stacks.B.shape[0])
        self.kind = (stacks.A.dtype, stacks.A.device)  # (tensor.device makes a new object per call)

    @property
    def ranks(self) -> list[int]:
        return self.stacks.ranks[: self.used]

    @property
    def rescaled(self) -> list[bool]:
        return self.stacks.rescaled[: self.used]

    @property
    def row_factor(self) -> Tensor | None:
        """The stacks' DoRA factors (row S: rows without an adapter) when one of these slots has one, else None."""
        return self.stacks.row_factor if any(self.rescaled) else None

    def slot(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.stacks.slot(i)


@dataclass(frozen=True)
class SlotContent:
    """One adapter as `RowSlots.write` takes it, built once (when a server registers it) and written as often
    as it becomes resident (vLLM's LoRA weights, written by set_lora).

    factors: {path of a Linear-like layer: (A (r, in), s·B (out, r), DoRA ratio - 1 (out,) or None)}, in the
        layer's adapter dtype (as `LoraVariant.slot_factors` gives them); CPU tensors are copied to the slots'
        device. records: {module path: [(store, record)]}: put in `getattr(module, store)[name]` while the
        adapter is resident: "lora" (a LoraWeights on a non-Linear layer), "tokens" (a TokenWeights, the
        same object on a tied head), "lora_copies" (a modules_to_save copy). nbytes: the tensors' size.
    """

    factors: dict[str, tuple[Tensor, Tensor, Tensor | None]] = field(default_factory=dict)
    records: dict[str, list[tuple[str, nn.Module]]] = field(default_factory=dict)
    nbytes: int = 0


class RowSlots:
    """A model's per-row slots: `capacity` adapters resident at once, written at `load` / `write`, freed at
    `evict`.

    attach: keep it on the model (`per_row_adapters` then uses it; one per model). dtype: the stacks' dtype
    (None: each layer's adapter dtype). A floating dtype narrower than the adapters' (bfloat16 for fp32
    adapters) halves the bytes a mixed step reads, at that dtype's precision: the factors are rounded once
    when written, each row's input is cast to it, the delta is added in the layer's dtype (functional.py).
    Raises ValueError for capacity < 1 or a dtype that is not floating point.
    """

    def __init__(self, model: nn.Module, capacity: int, attach: bool = True, dtype=None) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} is invalid: expected an integer >= 1")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} is invalid: expected a floating torch.dtype or None")
        self.model = model
        self.capacity = capacity
        self.dtype = dtype
        self.rmax = 0
        self.names: list[str | None] = [None] * capacity
        self._layers: dict[LoraLayer, LayerSlots] = {}
        self._written: dict[str, SlotContent] = {}  # adapters written by `write` (not on the model), resident
        self._hosted: dict[str, nn.Module] = {}  # path -> wrapped module, as `host` last found it
        self.members: set[nn.Module] = set()
        self.refresh()
        if attach:
            model.__dict__[SLOTS_ATTR] = self

    def index_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def is_written(self, name: str) -> bool:
        """Whether `name` is resident from a `write` (not an adapter of the model)."""
        return name in self._written

    def load(self, name: str, index: int | None = None) -> int:
        """Write adapter `name` of the model into slot `index` (default: its current slot, else the first free
        one).

        Returns the slot. Raises KeyError (unknown adapter), RuntimeError (slots full, or adapters merged),
        IndexError (index out of range).
        """
        get_adapter(self.model, name)
        index = self._claim(name, index)
        layers = [layer for _, layer in lora_layers(self.model) if isinstance(layer, LinearLike)]
        self._fit(max((layer.lora[name].r for layer in layers if name in layer.lora), default=0))
        for layer in layers:
            if name in layer.lora:
                self._slots_of(layer).write(index, *_factors(layer, name))
            elif layer in self._layers:
                self._layers[layer].reset(index)
        self.names[index] = name
        return index

    def write(self, name: str, content: SlotContent, index: int | None = None) -> int:
        """Make `name` resident from `content` alone (no adapter of that name on the model): its factors into
        slot `index` (default: its current slot, else the first free one) of every layer, its records onto
        their modules (wrapped now if they are not yet: `host`). Returns the slot.

        Raises ValueError (`name` is an adapter of the model), RuntimeError (slots full, adapters merged, a
        module another adapter holds), IndexError (index out of range).
        """
        if name in adapter_records(self.model):
            raise ValueError(f"adapter {name!r} is on the model: RowSlots.load it instead")
        layers = {path: self.host(path, "lora") for path in content.factors}
        for path, layer in layers.items():
            if not isinstance(layer, LinearLike):
                raise TypeError(f"slot factors for {path!r}: a {type(layer).__name__} is not Linear-like")
        holders = [
            (self.host(path, store), store, r) for path, rs in content.records.items() for store, r in rs
        ]
        index = self._claim(name, index)
        self._fit(max((A.shape[0] for A, _, _ in content.factors.values()), default=0))
        written = set()
        for path, (A, sB, factor) in content.factors.items():
            self._slots_of(layers[path]).write(index, A, sB, factor)
            written.add(layers[path])
        for layer, s in self._layers.items():
            if layer not in written:
                s.reset(index)
        for module, store, record in holders:
            getattr(module, store)[name] = record
        self.names[index] = name
        self._written[name] = content
        return index

    def host(self, path: str, store: str) -> nn.Module:
        """The module at `path`, wrapped (once) to hold per-row records of `store` ("lora" / "tokens": a Lora
        layer; "lora_copies": a SavedModule). A wrapper of the other kind holding nothing is undone first.
        Raises RuntimeError when that wrapper still holds an adapter, TypeError for a module kind LoRA
        cannot wrap."""
        want = SavedModule if store == "lora_copies" else LoraLayer
        module = self._hosted.get(path)
        if isinstance(module, want):  # (emptied by refresh whenever layers change)
            return module
        module = self.model.get_submodule(path)
        if isinstance(module, want):
            self._hosted[path] = module
            return module
        if isinstance(module, LoraLayer | SavedModule):
            if not self._empty(module):
                raise RuntimeError(
                    f"module {path!r} holds another adapter of another kind; it cannot hold both"
                )
            module = unwrap(module) if isinstance(module, LoraLayer) else unwrap_saved(module)
        new = wrap_saved(module) if want is SavedModule else wrap(module)
        replace_module(self.model, path, new)
        link_fused(self.model)
        self.refresh()
        return new

    def _empty(self, module: nn.Module) -> bool:
        if isinstance(module, SavedModule):
            return not module.lora_copies
        s = self._layers.get(module)
        return not (module.lora or module.tokens) and (s is None or not any(s.ranks))

    def evict(self, name: str) -> None:
        """Free `name`'s slot, and take what `write` put on the modules off them (no-op when not resident)."""
        i = self.index_of(name)
        if i is None:
            return
        for s in self._layers.values():
            s.reset(i)
        self.names[i] = None
        content = self._written.pop(name, None)
        for path, records in (content.records if content is not None else {}).items():
            module = self.model.get_submodule(path)
            for store, _ in records:
                held = getattr(module, store)
                if name in held:  # a tied head shares its embedding's record: taken off once per store
                    del held[name]

    def grow(self, capacity: int) -> None:
        """Room for `capacity` adapters (more than now; resident ones keep their slots)."""
        if capacity <= self.capacity:
            return
        self._layers = {layer: s.resized(capacity, self.rmax) for layer, s in self._layers.items()}
        self.names += [None] * (capacity - self.capacity)
        self.capacity = capacity

    def refresh(self) -> None:
        """Follow adapters added or deleted since (called by add_adapter / delete_adapter): drop the slots
        of layers that left the model and of adapters that no longer exist; an adapter `write` made resident
        whose modules were unwrapped meanwhile (another adapter deleted) is written again."""
        present = {layer for _, layer in adapter_layers(self.model)}
        self.members = present
        self._hosted = {}
        self._layers = {layer: s for layer, s in self._layers.items() if layer in present}
        known = set(self.model.__dict__.get("lorakit_adapters", {}))
        for n in [n for n in self.names if n is not None and n not in known and n not in self._written]:
            self.evict(n)
        for n, content in list(self._written.items()):
            paths = [*content.factors, *content.records]
            if not all(isinstance(self.model.get_submodule(p), LoraLayer | SavedModule) for p in paths):
                self.write(n, content, self.index_of(n))

    def layer_slots(self, layer: nn.Module) -> LayerSlots | None:
        return self._layers.get(layer)

    def mapping(self, names: Sequence[str | None]) -> RowMapping:
        """The step's RowMapping for batch rows `names` (each resident, or None). Raises KeyError otherwise."""
        return RowMapping(self, names)

    def merged(self) -> bool:
        """Whether any adapter is merged into the model's weights (its layers as of the last refresh)."""
        return any(getattr(layer, "merged", None) for layer in self.members)

    def _claim(self, name: str, index: int | None) -> int:
        """The slot `name` goes to (see `load`), emptied of what it held."""
        if self.merged():
            raise RuntimeError("per-row adapters need unmerged adapters; unmerge first")
        current = self.index_of(name)
        if index is None:
            index = current if current is not None else self._free_slot(name)
        if not 0 <= index < self.capacity:
            raise IndexError(f"slot {index} is outside 0..{self.capacity - 1}")
        if current is not None and current != index:
            self.evict(name)
        if self.names[index] is not None:
            self.evict(self.names[index])
        return index

    def reserve(self, content: SlotContent) -> None:
        """Room for `content`'s rank in every slot now (as vLLM's max_lora_rank, fixed before serving), so the
        stacks keep one shape whichever adapters are resident, and an adapter's outputs do not depend on
        which others were written before it."""
        self._fit(max((A.shape[0] for A, _, _ in content.factors.values()), default=0))

    def _fit(self, rank: int) -> None:
        if rank > self.rmax:
            self.rmax = rank
            self._layers = {layer: s.resized(self.capacity, rank) for layer, s in self._layers.items()}

    def _free_slot(self, name: str) -> int:
        if None not in self.names:
            raise RuntimeError(
                f"cannot load adapter {name!r}: all {self.capacity} slots are in use ({self.names}); evict one"
            )
        return self.names.index(None)

    def _slots_of(self, layer: LinearLike) -> LayerSlots:
        if layer not in self._layers:
            d_in, d_out = layer._in_out()
            ref = next(iter(layer.lora.values())).A if layer.lora else layer.weight.new_empty(0)
            dtype = self.dtype or (ref.dtype if layer.lora else adapter_dtype(layer.weight))
            self._layers[layer] = LayerSlots(self.capacity, self.rmax, d_in, d_out, dtype, ref.device)
        return self._layers[layer]


def _factors(layer: LinearLike, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    w = layer.lora[name]
    with torch.no_grad():
        return w.variant.slot_factors(layer, w)


def attached_slots(model: nn.Module) -> RowSlots | None:
    return model.__dict__.get(SLOTS_ATTR)


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside, batch row i uses adapter names[i] alone (None: the base model). Inference (no_grad) uses the
    slots; with gradients each group of rows runs the adapter's own (differentiable) path.

    With `RowSlots` attached to the model, names may also be adapters `RowSlots.write` made resident (not
    on the model); adapters of the model not yet resident are loaded into free slots (or in place of
    resident ones this batch does not use); without, temporary slots are written for this block. Everything
    an adapter carries applies per row: LoRA, DoRA, trainable tokens and modules_to_save.

    Raises:
        KeyError: an unknown name. RuntimeError: merged adapters, or more adapters than slots.
    """
    slots = attached_slots(model)
    for n in names:
        if (
            n is not None
            and not (slots is not None and slots.is_written(n))
            and get_adapter(model, n).param_targets
        ):
            raise RuntimeError(f"adapter {n!r} adapts parameters (target_parameters): not per-row")
    if slots.merged() if slots is not None else any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("per-row adapters need unmerged adapters; unmerge first")
    distinct = list(dict.fromkeys(n for n in names if n is not None))
    if slots is None:
        slots = RowSlots(model, max(len(distinct), 1), attach=False)
    if len(distinct) > slots.capacity:
        raise RuntimeError(f"{len(distinct)} adapters in one batch, but the slots hold {slots.capacity}")
    for n in distinct:
        if slots.index_of(n) is None:
            if None not in slots.names:  # full: replace a resident adapter this batch does not use
                slots.evict(next(r for r in slots.names if r not in distinct))
            slots.load(n)
    with rowstate.using(slots.mapping(names)):
        yield model
