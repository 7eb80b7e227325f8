"""The fast LoRA paths against the plain reference (functional.py): outputs and gradients, per layer type, with
and without dropout, in fp32 and bf16; whole models; checkpointing; inference; mixed per-row batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import lorakit
import lorakit.fast.linear as FL
from conftest import randomize_adapters, rows_alone, tiny_gpt2, tiny_llama
from lorakit import functional as LF
from lorakit.fast import plain_path
from lorakit.layers import wrap


def _layer(kind: str, bias: bool, dtype, dropout: float):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias) if kind == "linear" else Conv1D(20, 24)
    base = base.to(dtype)
    layer = wrap(base)
    layer.weight.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(bias)  # Conv1D always has a bias; let it train only when asked
    w = layer.add_lora("a", r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        w.B.normal_()
    layer.active = ("a",)
    return layer.train(), w


def _reference(layer, w, x, keep, keep_scale):
    """base(x) + functional.lora_linear on D(x), in plain autograd."""
    y = layer.base_class.forward(layer, x)
    xa = x.to(w.A.dtype)
    if keep is not None:
        xa = xa * keep * keep_scale
    return y + LF.lora_linear(xa, w.A, w.B, w.scale).to(y.dtype)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_reference(kind, bias, dropout, dtype, monkeypatch):
    if kind == "conv1d" and not bias:
        pytest.skip("Conv1D always has a bias")
    layer, w = _layer(kind, bias, dtype, dropout)
    monkeypatch.setattr(FL, "draw_seed", lambda: 1234)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 5, 20, dtype=dtype)

    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"  # the fast path was taken
    params = [x, w.A, w.B] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, dy)

    keep, keep_scale = (None, 1.0)
    if dropout:
        keep, keep_scale = FL.dropout_keep_mask((15, 24), dropout, 1234, x.device)
        keep = keep.view(3, 5, 24)
    y_ref = _reference(layer, w, x, keep, keep_scale)
    ref = torch.autograd.grad(y_ref, params, dy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    for g, r, n in zip(grads, ref, ["x", "A", "B", "bias"]):
        torch.testing.assert_close(g, r, **tol, msg=n)


def test_dropout_mask_probability_and_scale():
    keep, scale = FL.dropout_keep_mask((400, 500), 0.05, 7, torch.device("cpu"))
    drop = 1 - keep.float().mean().item()
    assert abs(drop - 0.05) < 0.002
    assert scale == pytest.approx(1 / (1 - round(0.05 * 65536) / 65536))
    again, _ = FL.dropout_keep_mask((400, 500), 0.05, 7, torch.device("cpu"))
    assert torch.equal(keep, again)
    assert FL.dropout_keep_mask((10,), 0.0, 7, torch.device("cpu"))[0].all()


@pytest.mark.parametrize("shape", [(400, 500), (5, 13), (1, 1), (3, 7, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_keep_masks_are_the_16_bit_lanes_in_every_dtype(shape, dtype):
    """The mask is the documented one (64-bit draws read as four 16-bit lanes, kept where lane ≥ p'·2¹⁶ -
    2¹⁵), whatever dtype's buffer the bits are drawn into, and the float mask is the same 0/1 values."""
    n = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(99)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=g)
    drop = round(0.05 * 65536)
    ref = (bits.view(torch.int16)[:n].view(shape) >= drop - 32768).to(torch.uint8)
    keep, keepf, scale = FL.keep_masks(shape, 0.05, 99, torch.device("cpu"), dtype)
    assert keep.dtype == torch.uint8 and keepf.dtype == dtype and keep.shape == keepf.shape == shape
    assert torch.equal(keep, ref)
    assert torch.equal(keepf, ref.to(dtype))
    assert scale == 65536 / (65536 - drop)
    assert torch.equal(FL.dropout_keep_mask(shape, 0.05, 99, torch.device("cpu"))[0], ref)


@pytest.mark.parametrize("frozen", ["A", "x"])
def test_dropout_backward_when_A_or_x_needs_no_grad(frozen, monkeypatch):
    # Without dA the buffer of D(x) is not formed and D(G A) takes its own; without dx none of it is needed.
    layer, w = _layer("linear", False, torch.float32, 0.3)
    monkeypatch.setattr(FL, "draw_seed", lambda: 1234)
    x = torch.randn(3, 5, 24, requires_grad=frozen != "x")
    w.A.requires_grad_(frozen != "A")
    dy = torch.randn(3, 5, 20)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    params = [t for t in (x, w.A, w.B) if t.requires_grad]
    grads = torch.autograd.grad(y, params, dy)
    keep, keep_scale = FL.dropout_keep_mask((15, 24), 0.3, 1234, x.device)
    ref = torch.autograd.grad(_reference(layer, w, x, keep.view(3, 5, 24), keep_scale), params, dy)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_model_matches_plain_path(make, ids):
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    model.train()
    if make is tiny_gpt2:
        model.eval()  # GPT-2's own dropout would draw differently in the two runs
    out, grads = _grads(model, ids)
    with plain_path():
        ref_out, ref_grads = _grads(model, ids)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_zero_B_is_exactly_the_base_in_training(ids):
    model = tiny_llama().train()
    with torch.no_grad():
        base = model(ids).logits
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets="all-linear", dropout=0.1))
    out = model(ids).logits
    assert out.requires_grad
    assert torch.equal(out, base)


def test_checkpointing_replays_dropout(ids):
    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.2, targets="all-linear"))
    randomize_adapters(model)
    torch.manual_seed(5)
    out, grads = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(5)
    out_ckpt, grads_ckpt = _grads(model, ids)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_dropout_model_grads_match_masks_it_drew(monkeypatch, ids):
    # Each layer's fast backward against autograd through the same masks: record (x, seed) per call and
    # rebuild the layer outputs' gradients with the reference formula on a copy.
    model = tiny_llama().train()
    lorakit.add_adapter(
        model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.25, targets=["q_proj", "down_proj"])
    )
    randomize_adapters(model)
    seeds = iter(range(100, 200))
    monkeypatch.setattr(FL, "draw_seed", lambda: next(seeds))
    out, grads = _grads(model, ids)

    # Reference: the plain path with F.dropout replaced by the same masks, drawn in the same call order.
    ref_seeds = iter(range(100, 200))

    def masked(x, p, training=True, inplace=False):
        keep, scale = FL.dropout_keep_mask(
            tuple(x.reshape(-1, x.shape[-1]).shape), p, next(ref_seeds), x.device
        )
        return x * keep.view(x.shape) * scale

    monkeypatch.setattr(LF.F, "dropout", masked)
    with plain_path():
        ref_out, ref_grads = _grads(model, ids)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_inference_path_several_adapters(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"), name="a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), name="b")
    randomize_adapters(model)
    lorakit.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        out = model(ids).logits
        with plain_path():
            ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fallbacks_still_correct(ids):
    # DoRA and two adapters while training take the plain path; results equal plain_path()'s exactly.
    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["q_proj"], use_dora=True), name="d")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["v_proj"]), name="a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["v_proj"]), name="b")
    randomize_adapters(model)
    lorakit.set_adapter(model, ["d", "a", "b"])
    out, grads = _grads(model, ids)
    with plain_path():
        ref_out, ref_grads = _grads(model, ids)
    assert torch.equal(out, ref_out)
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n


@pytest.mark.parametrize("seq", [7, 60])  # 5×7 tokens: the grouped decode path; 5×60 > STACK_TOKENS: runs
# Three adapters meet on q_proj / up_proj in the last case: STACK_AT_ONCE, stacked from the first call.
@pytest.mark.parametrize(
    "names",
    [
        ["a", "a", "b", None, "b"],
        ["b", "a", None, "a", "b"],
        ["c", "a", "b", None, "c"],
        ["a", "b", "a", "c", "a"],
    ],
)  # the last: "a" on 3 runs, past MAX_RUNS: gathered and written back
def test_per_row_runs_match_single_adapter_rows(names, seq):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"), name="a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=8, targets=["q_proj", "up_proj"]), name="b")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=3, targets=["q_proj", "up_proj"]), name="c")
    randomize_adapters(model)
    x = torch.randint(3, 128, (len(names), seq), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), lorakit.per_row_adapters(model, names):
        mixed = model(x).logits
        again = model(x).logits  # decode sizes: the second call in a context takes the grouped path
    torch.testing.assert_close(again, mixed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, rows_alone(model, x, names), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq", [3, 70])  # 4×3 tokens: grouped; 4×70 > STACK_TOKENS (256): by runs
def test_slots_are_written_at_load_and_follow_evict_and_delete(seq):
    """Attached RowSlots hold copies written at load (vLLM's set_lora / reset_lora): per_row_adapters reads
    them and builds nothing; an in-place change shows only after a reload; delete_adapter evicts."""
    from lorakit.slots import SLOTS_ATTR

    model = tiny_llama()
    for i, name in enumerate("abc"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2 + i, targets=["q_proj", "up_proj"]), name=name)
    randomize_adapters(model)
    slots = lorakit.RowSlots(model, capacity=2)
    assert slots.load("a") == 0 and slots.load("b") == 1
    with pytest.raises(RuntimeError, match="slots are in use"):
        slots.load("c")
    names = ["b", "a", None, "b"]
    x = torch.randint(3, 128, (4, seq), generator=torch.Generator().manual_seed(3))

    def mixed():
        with torch.no_grad(), lorakit.per_row_adapters(model, names):
            return model(x).logits

    first = mixed()
    torch.testing.assert_close(first, rows_alone(model, x, names), rtol=1e-5, atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora["b"].B.mul_(3.0)  # an in-place update (what an optimizer step does)
    torch.testing.assert_close(mixed(), first, rtol=0, atol=0)  # the slot is a copy taken at load
    slots.load("b")  # reload: written again into its own slot
    assert slots.index_of("b") == 1
    changed = mixed()
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, rows_alone(model, x, names), rtol=1e-5, atol=1e-5)
    lorakit.delete_adapter(model, "a")
    assert slots.names == [None, "b"]
    lorakit.add_adapter(model, lorakit.LoraConfig(r=6, targets=["q_proj"]), name="a")  # a larger rank
    randomize_adapters(model, seed=9)
    slots.load("b")
    with torch.no_grad(), lorakit.per_row_adapters(model, names):  # "a" loads into the free slot
        again = model(x).logits
    assert slots.index_of("a") == 0 and slots.rmax == 6
    torch.testing.assert_close(again, rows_alone(model, x, names), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lorakit.per_row_adapters(model, ["c", "a"]):  # full: "c" replaces unused "b"
        assert slots.names == ["a", "c"]
    with pytest.raises(RuntimeError, match="slots hold 2"), lorakit.per_row_adapters(model, ["a", "b", "c"]):
        pass
    plain = lorakit.unload(model, merge=False)
    assert not any("slot" in k for m in plain.modules() for k in m.__dict__)  # nothing was put on layers
    assert SLOTS_ATTR not in plain.__dict__  # and unload drops the model-level slots


@pytest.mark.parametrize("seq", [4, 70])
def test_per_row_dora_tokens_and_saved_modules_equal_each_alone(seq):
    """What other servers refuse per row: DoRA, trainable tokens (embedding and untied head rows) and a
    modules_to_save copy, each in a mixed batch, equal to running each adapter alone on its rows."""
    model = tiny_llama(tie=True)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True), name="d")
    lorakit.add_adapter(
        model, lorakit.LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[5, 9]), "t"
    )
    lorakit.add_adapter(
        model, lorakit.LoraConfig(r=2, targets=["k_proj"], modules_to_save=["norm"]), name="s"
    )
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, targets=["q_proj", "o_proj"]), name="p")
    randomize_adapters(model, std=0.3)
    names = ["d", "t", None, "s", "p", "d"]
    x = torch.randint(3, 128, (len(names), seq), generator=torch.Generator().manual_seed(4))
    x[:, 1] = 5  # the trainable token rows matter
    with torch.no_grad(), lorakit.per_row_adapters(model, names):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, rows_alone(model, x, names), rtol=1e-5, atol=1e-5)


def _fused_reference_dropout(monkeypatch):
    """The plain path's F.dropout replaced by the fast path's masks: one per distinct input tensor, in call
    order, so projections reading the same x share one (as the fused Function draws it)."""
    seeds = iter(range(100, 400))
    last: dict = {}

    def masked(x, p, training=True, inplace=False):
        if last.get("x") is not x:
            keep, scale = FL.dropout_keep_mask(
                tuple(x.reshape(-1, x.shape[-1]).shape), p, next(seeds), x.device
            )
            last.update(x=x, keep=keep.view(x.shape), scale=scale)
        return x * last["keep"] * last["scale"]

    monkeypatch.setattr(LF.F, "dropout", masked)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_projections_match_plain_path(dropout, monkeypatch, ids):
    """q/k/v and gate/up train as one Function call each (one matmul of x with the stacked A, one dx): the
    outputs and every gradient equal the plain path's, with the shared dropout mask."""
    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize_adapters(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused is not None
    calls = []
    real = FL.LoraLinearFunction.apply
    monkeypatch.setattr(FL.LoraLinearFunction, "apply", lambda *a: calls.append(len(a[3])) or real(*a))
    seeds = iter(range(100, 400))
    monkeypatch.setattr(FL, "draw_seed", lambda: next(seeds))
    out, grads = _grads(model, ids)
    assert sorted(set(calls)) == [1, 2, 3] and calls.count(3) == 2  # q/k/v fused in each of the 2 layers
    _fused_reference_dropout(monkeypatch)
    with plain_path():
        ref_out, ref_grads = _grads(model, ids)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_fused_group_with_one_sibling_not_called_or_other_input(ids):
    """Siblings called with other tensors (here outside their parent: test_fast_fused.py has the parent's
    call) compute alone and get the plain path's outputs and gradients."""
    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["q_proj", "k_proj", "v_proj"]))
    randomize_adapters(model)
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[0].self_attn.k_proj
    x = torch.randn(2, 5, q.in_features, requires_grad=True)
    other = torch.randn(2, 5, q.in_features)
    yq, yk = q(x), k(other)
    (yq.sum() + yk.sum()).backward()
    with plain_path():
        x2 = x.detach().clone().requires_grad_(True)
        refq, refk = q(x2), k(other)
    torch.testing.assert_close(yq, refq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yk, refk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, torch.autograd.grad(refq.sum(), x2)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seq", [3, 70])  # 4×3 tokens: grouped; 4×70 > STACK_TOKENS (256): by runs
def test_bfloat16_slots_equal_each_adapter_alone_at_bfloat16_precision(seq):
    """RowSlots(dtype=bfloat16) over fp32 adapters (LoRA and DoRA): stacks in bf16, rows equal each adapter
    alone in fp32 within bf16 rounding (and not bit-equal: the bf16 stacks are what ran). The adapters are
    strong (std 0.3: their delta is larger than the tiny model's logits), so rounding compounds over the
    layers and positions: measured 0.4% (3 tokens) and 2.5% (60) of the delta's norm; a wrong factor,
    scale or slot is ~100%."""
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"), name="a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"], use_dora=True), name="d")
    randomize_adapters(model, std=0.3)
    slots = lorakit.RowSlots(model, capacity=2, dtype=torch.bfloat16)
    slots.load("a"), slots.load("d")
    q = model.model.layers[0].self_attn.q_proj
    assert (
        slots.layer_slots(q).A.dtype == torch.bfloat16
        and slots.layer_slots(q).row_factor.dtype == torch.bfloat16
    )
    names = ["d", "a", None, "a"]
    x = torch.randint(3, 128, (len(names), seq), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), lorakit.per_row_adapters(model, names):
        mixed = model(x).logits
    ref = rows_alone(model, x, names)
    assert mixed.dtype == torch.float32 and not torch.equal(mixed[[0, 1, 3]], ref[[0, 1, 3]])
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(x).logits
    assert (mixed - ref).norm() <= 0.05 * (ref - base).norm()
    torch.testing.assert_close(mixed[2], ref[2], rtol=1e-5, atol=1e-5)  # the base row: no slot read
    with pytest.raises(ValueError, match="floating torch.dtype"):
        lorakit.RowSlots(tiny_llama(), capacity=2, dtype=torch.int8)
