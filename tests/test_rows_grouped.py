"""The grouped per-row path (fast/rows.py `_grouped_`, functional.grouped_lora_into_): each row meets its own
slot alone, tested against the plain math per row and by the arithmetic it does."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from conftest import randomize_adapters, rows_alone, tiny_llama
from lorakit import fast
from lorakit import functional as LF


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16])
def test_grouped_lora_into_equals_lora_into_on_each_row(tokens, ydtype):
    """3 groups of up to 2 places over 5 rows: a group with 2 rows, one with 1 (a masked spare place that
    repeats its row), one empty (both places masked, on row 0); row 4 in no group. Each row gets exactly
    lora_into_ with its group's factors; the rest stays as it was."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, tokens, 6, generator=g)
    A, sB = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 7, generator=g)
    y0 = torch.randn(5, tokens, 7, generator=g).to(ydtype)
    index = torch.tensor([1, 3, 2, 2, 0, 0])  # group 0: rows 1, 3; group 1: row 2 (+ a spare); group 2: none
    keep = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]).view(3, 2, 1, 1)
    y = y0.clone()
    LF.grouped_lora_into_(y, x, A, sB, index, keep)
    ref = y0.clone()
    for row, group in ((1, 0), (3, 0), (2, 1)):
        LF.lora_into_(ref[row], x[row], A[group], sB[group].t())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[[0, 4]], y0[[0, 4]])  # the empty group's masked places add exactly nothing


class _MatmulWork(TorchDispatchMode):
    """Counts the multiply-adds of every matmul op (mm, addmm and its in-place form, bmm, baddbmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            a, b = args[0], args[1]
        elif name in ("addmm", "addmm_", "baddbmm", "baddbmm_"):
            a, b = args[1], args[2]
        else:
            return func(*args, **(kwargs or {}))
        self.macs += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def _adapter_work(model, names, ids) -> int:
    """Matmul multiply-adds of one forward under per_row_adapters(names), minus the base model's."""

    def work(rows):
        # the eager pair (plain_path): the native kernel's C++ matmuls are out of a dispatch mode's sight
        with (
            torch.no_grad(),
            fast.plain_path(),
            lorakit.per_row_adapters(model, rows),
            _MatmulWork() as count,
        ):
            model(ids)
        return count.macs

    return work(names) - work([None] * len(names))


def test_a_mixed_step_multiplies_each_row_by_its_own_slot_alone():
    """4 adapters of one rank, one row each: the step's adapter arithmetic is that of one adapter over the 4
    rows (each row against its own factors), not 4 times it (every row against every slot, masked): what
    made 8 mixed adapters cost 1.3× the base's decode step at SmolLM2's shapes. The logits equal each row's
    adapter alone."""
    model = tiny_llama()
    for name in "abcd":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets="all-linear"), name=name)
    randomize_adapters(model)
    lorakit.RowSlots(model, capacity=4).load("a")
    ids = torch.randint(3, 128, (4, 3), generator=torch.Generator().manual_seed(1))
    mixed = _adapter_work(model, list("abcd"), ids)
    one = _adapter_work(model, list("aaaa"), ids)  # one adapter: by runs, its own factors alone
    assert one > 0 and mixed == one
    with torch.no_grad(), lorakit.per_row_adapters(model, list("abcd")):
        logits = model(ids).logits
    torch.testing.assert_close(logits, rows_alone(model, ids, list("abcd")), rtol=1e-5, atol=1e-5)


def test_mapping_groups_rows_by_slot_with_masked_spare_places():
    """RowMapping.slot_groups: slot s's rows at [s·P, s·P + count), spare places repeating its first row
    (row 0 for a slot no row uses) and masked; base rows in no group."""
    model = tiny_llama()
    for name in "ab":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name=name)
    slots = lorakit.RowSlots(model, capacity=3)
    slots.load("a", 2), slots.load("b", 0)
    mapping = slots.mapping(["a", None, "a", "b", "a"])
    index, keep = mapping.slot_groups(torch.float32, torch.device("cpu"))
    assert mapping.width == 3 and mapping.slots.used == 3
    assert index.tolist() == [3, 3, 3, 0, 0, 0, 0, 2, 4]
    assert keep.flatten().tolist() == [1, 0, 0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16])
def test_grouped_lora_into_in_place_order_equals_lora_into_on_each_row(tokens, ydtype):
    """index None: group g is rows [g·P, (g + 1)·P); each row gets lora_into_ with its group's factors. A
    batch that is not G equal groups is refused."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, tokens, 5, generator=g)
    A, sB = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 7, generator=g)
    y0 = torch.randn(6, tokens, 7, generator=g).to(ydtype)
    y = y0.clone()
    LF.grouped_lora_into_(y, x, A, sB)
    ref = y0.clone()
    for row in range(6):
        LF.lora_into_(ref[row], x[row], A[row // 2], sB[row // 2].t())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="5 rows is not 3 groups"):
        LF.grouped_lora_into_(y[:5], x[:5], A, sB)


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_rows_in_slot_order_gather_nothing():
    """Rows in slot order with equal counts (base rows after): the mapping is in place order, the step
    runs no index_select / index_add_ / pad mask, and each row's logits equal its adapter alone; the same
    rows out of order are gathered (and still right); unequal counts are padded and masked."""
    model = tiny_llama()
    for name in "ab":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets="all-linear"), name=name)
    randomize_adapters(model)
    slots = lorakit.RowSlots(model, capacity=2)
    slots.load("b", 0), slots.load("a", 1)
    ids = torch.randint(3, 128, (5, 3), generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    for names, in_order in ((["b", "b", "a", "a", None], True), (["a", "b", None, "a", "b"], False)):
        mapping = slots.mapping(names)
        index, keep = mapping.slot_groups(torch.float32, cpu)
        assert mapping.in_order is in_order and (index is None) is in_order and keep is None
        # (the eager pair: the native kernel gathers inside its one C++ call, out of a dispatch mode's sight)
        with torch.no_grad(), fast.plain_path(), lorakit.per_row_adapters(model, names), _OpNames() as ops:
            logits = model(ids).logits
        assert ("index_select" in ops.names) is not in_order and ("index_add_" in ops.names) is not in_order
        torch.testing.assert_close(logits, rows_alone(model, ids, names), rtol=1e-5, atol=1e-5)
    uneven = slots.mapping(["b", "b", "a", None, None])
    index, keep = uneven.slot_groups(torch.float32, cpu)
    assert not uneven.in_order and index.tolist() == [0, 1, 2, 2] and keep.flatten().tolist() == [1, 1, 1, 0]
