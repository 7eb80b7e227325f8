"""lorakit's native CPU kernel (fast/native/grouped.cpp) against the plain math (functional.grouped_lora_into_),
and its use on the per-row path (fast/rows.py) against the eager path inside fast.plain_path()."""

from __future__ import annotations

import pytest
import torch

from lorakit import fast
from lorakit import functional as LF
from lorakit.fast import native


@pytest.fixture(scope="module", autouse=True)
def kernel():
    # conftest's session fixture loads it wherever a C++ compiler is (and fails the session if it will not build)
    if not native.loaded():
        pytest.skip("no C++ compiler on this machine: the native kernel cannot be built")


def operands(G, W, T, r, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G * W, T, d_in, generator=g)
    y = torch.randn(G * W, T, d_out, generator=g)
    A = torch.randn(G, r, d_in, generator=g)
    sB = torch.randn(G, r, d_out, generator=g) * 0.1
    return y, x, A, sB


def run_kernel(y, x, A, sB, index=None, keep=None, width=None):
    width = width if width is not None else (x.shape[0] if index is None else index.shape[0]) // A.shape[0]
    tokens = x.shape[1]
    native.grouped_lora_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), A, sB,
                         torch.empty(0, dtype=torch.long) if index is None else index,
                         torch.empty(0) if keep is None else keep.reshape(-1), width, tokens)  # fmt: skip


# (G, W, T, r, in, out): decode at SmolLM2's shapes, odd sizes (tails of the 16-float and 4-row blocks), one
# group of many rows, an odd row count, several tokens per row (a prefill chunk), rank 1 and 256
CASES = [(8, 2, 1, 16, 576, 192), (3, 3, 2, 5, 37, 70), (1, 16, 1, 8, 64, 1536), (2, 1, 4, 1, 17, 15),
         (4, 5, 1, 7, 130, 129), (2, 2, 1, 256, 48, 80)]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_in_place_order_equals_the_plain_pair(case):
    y, x, A, sB = operands(*case)
    want = y.clone()
    LF.grouped_lora_into_(want, x, A, sB)
    run_kernel(y, x, A, sB)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES[:4])
def test_gathered_rows_with_padding_equal_the_plain_pair(case):
    G, W, T, r, d_in, d_out = case
    y, x, A, sB = operands(*case, seed=1)
    batch = G * W
    g = torch.Generator().manual_seed(2)
    index = torch.randperm(batch, generator=g)
    keep = (torch.rand(G, W, 1, 1, generator=g) > 0.3).float()
    dropped = index[keep.view(-1) == 0]
    index[keep.view(-1) == 0] = index[0]  # a padding place repeats a row (masked), as RowMapping makes them
    want = y.clone()
    LF.grouped_lora_into_(want, x, A, sB, index, keep)
    run_kernel(y, x, A, sB, index, keep)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert dropped.numel() == 0 or torch.equal(y[dropped], want[dropped])


def test_repeated_rows_add_up_as_the_plain_pair_does():
    y, x, A, sB = operands(3, 2, 1, 4, 40, 33, seed=3)
    index = torch.tensor([0, 1, 1, 2, 0, 0])  # rows under several kept places: their deltas add up
    want = y.clone()
    LF.grouped_lora_into_(want, x, A, sB, index)
    run_kernel(y, x, A, sB, index)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


def test_bad_operands_are_refused_with_what_was_expected():
    y, x, A, sB = operands(2, 2, 1, 4, 16, 16)
    with pytest.raises(RuntimeError, match="float32"):
        run_kernel(y.double(), x.double(), A, sB)
    with pytest.raises(RuntimeError, match="outside 4 rows"):
        run_kernel(y, x, A, sB, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(RuntimeError, match="do not agree"):
        run_kernel(y, x[..., :8].contiguous(), A, sB)
    with pytest.raises(RuntimeError, match="not 2 groups of 3"):
        run_kernel(y, x, A, sB, width=3)


@pytest.mark.parametrize(
    "names",
    [
        list("aabbccdd"),
        ["a", "b", "b", None, "c", "d", "d", "d"],
    ],  # in slot order (views); uneven (gathered, padded)
)
def test_the_per_row_path_uses_it_and_equals_each_row_alone(monkeypatch, names):
    """A mixed batch over a tiny Llama: every Lora layer's pair goes through the kernel (counted), and the
    logits equal the eager path (fast.plain_path) and each row under its adapter alone."""
    import lorakit
    from conftest import randomize_adapters, rows_alone, tiny_llama
    from lorakit.adapters import lora_layers

    model = tiny_llama()
    for name in "abcd":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets="all-linear"), name=name)
    randomize_adapters(model)
    slots = lorakit.RowSlots(model, capacity=4)
    for name in "abcd":
        slots.load(name)
    ids = torch.randint(3, 128, (len(names), 5), generator=torch.Generator().manual_seed(4))
    calls = []
    kernel = native.grouped_lora_
    monkeypatch.setattr(native, "grouped_lora_", lambda *a: (calls.append(a[0].shape), kernel(*a))[1])
    with torch.no_grad():
        with lorakit.per_row_adapters(model, names):
            got = model(ids).logits
        layers = len(calls)
        with fast.plain_path(), lorakit.per_row_adapters(model, names):
            eager = model(ids).logits
    assert layers == len(list(lora_layers(model))) and len(calls) == layers  # none inside plain_path
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, rows_alone(model, ids, names), rtol=1e-5, atol=1e-5)
