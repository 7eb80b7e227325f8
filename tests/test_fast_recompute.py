"""Rebuilding the LoRA input in backward (lorakit/fast/recompute.py): the gradients are bitwise those of saving
x and match the plain path; x is really not kept (only tensors the base keeps too); unrecognised producers,
saved-tensor hooks and the opt-out fall back to saving x."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.fast import offload_activations, plain_path, recompute, set_recompute


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return GemmaForCausalLM(cfg).eval()


def _adapted(make, dtype=torch.float32, dropout=0.0):
    model = make().to(dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize_adapters(model)
    with torch.no_grad():  # norm weights away from 1 (Llama) / 0 (Gemma), so a dropped w would show
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) * 0.3)
    return model.train()


def _step(model, ids, seed=5):
    """Logits and adapter gradients of one step, and the LoRA Function nodes of its graph."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids).logits
    nodes = _lora_nodes(out)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, nodes


def _lora_nodes(t: torch.Tensor) -> list:
    seen, stack, found = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LoraLinearFunctionBackward":
            found.append(node)
        stack += [f for f, _ in node.next_functions]
    return found


def _storages(nodes) -> set[int]:
    return {t.untyped_storage().data_ptr() for n in nodes for t in n.saved_tensors if t is not None}


def _base_storages(t: torch.Tensor) -> set[int]:
    """Storages kept by the graph's non-LoRA nodes."""
    seen, stack, out = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "LoraLinearFunctionBackward":
            for a in dir(node):
                if a.startswith("_saved_") and isinstance(v := getattr(node, a), torch.Tensor):
                    out.add(v.untyped_storage().data_ptr())
        stack += [f for f, _ in node.next_functions]
    return out


@pytest.mark.parametrize(
    "make,dtype,dropout",
    [
        (tiny_llama, torch.float32, 0.0),
        (tiny_llama, torch.float32, 0.25),
        (tiny_llama, torch.bfloat16, 0.0),
        (tiny_gemma, torch.float32, 0.0),
        (tiny_gemma, torch.bfloat16, 0.0),
    ],
)
def test_gradients_bitwise_those_of_saving_x_and_match_plain_path(make, dtype, dropout, ids):
    model = _adapted(make, dtype, dropout)
    out, grads, nodes = _step(model, ids)
    # q/k/v (after layer 0, whose input has no graph), gate/up and down_proj in every layer rebuild x
    rebuilt = [n for n in nodes if n.plan is not None]
    assert len(rebuilt) == 2 * 2 + 1, [n.plan for n in nodes]
    set_recompute(model, False)
    out_s, grads_s, nodes_s = _step(model, ids)
    assert all(n.plan is None for n in nodes_s)
    assert torch.equal(out, out_s)
    assert grads.keys() == grads_s.keys() and len(grads) > 10
    for n in grads:
        assert torch.equal(grads[n], grads_s[n]), n
    if dropout:
        return  # the plain path draws its own masks; test_fast_lora checks the masked path against it
    with plain_path():
        out_p, grads_p, _ = _step(model, ids)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, out_p, **tol)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_p[n], **tol, msg=n)


def test_rebuilt_inputs_keep_nothing_the_base_does_not(ids):
    """With recompute, every N×in tensor a LoRA node keeps is one the base's nodes keep too (h, rstd,
    act(gate), up): what LoRA alone adds is u (N×r) and, in layer 0, the x that has no graph."""
    model = _adapted(tiny_llama)
    hidden = model.config.hidden_size
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def own_inputs():  # the (2, 9, ·) tensors LoRA nodes keep that no base node keeps
        out = model(ids).logits
        base = _base_storages(out) | params
        kept = [t for n in _lora_nodes(out) for t in n.saved_tensors if t is not None]
        own = [t for t in kept if t.untyped_storage().data_ptr() not in base and t.dim() == 3]
        return sorted(tuple(t.shape) for t in own)

    assert own_inputs() == [(2, 9, hidden)]  # layer 0's x_attn only (its input has no graph)
    set_recompute(model, False)
    inter = model.config.intermediate_size
    # saved: x_attn, x_mlp (hidden) and x_down (intermediate) in each of the 2 layers
    assert own_inputs() == sorted([(2, 9, hidden)] * 4 + [(2, 9, inter)] * 2)


def test_gpt2_rebuilds_its_mlp_input_and_saves_the_layernorm_outputs(ids):
    """GPT-2: c_proj of the MLP reads gelu_new(h) = (0.5 h) · (1 + tanh(…)), rebuilt; c_attn and c_fc read a
    LayerNorm output (not recognised: x saved). Gradients equal those of saving every x."""
    model = _adapted(tiny_gpt2).eval()  # GPT-2's own dropout off: the two runs must see the same model
    out, grads, nodes = _step(model, ids)
    assert sum(n.plan is not None for n in nodes) == 2  # mlp.c_proj in each of the 2 blocks
    set_recompute(model, False)
    out_s, grads_s, _ = _step(model, ids)
    assert torch.equal(out, out_s)
    for n in grads:
        assert torch.equal(grads[n], grads_s[n]), n


def test_source_recognises_products_and_rebuilds_bitwise():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(16, generator=g)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    for x in (
        w * (h * rstd),  # Llama RMSNorm, fp32
        w.bfloat16() * (h * rstd).bfloat16(),  # Llama RMSNorm, bf16
        ((h * rstd) * (1.0 + w)).bfloat16(),  # Gemma RMSNorm, bf16
        torch.nn.functional.silu(h) * h.exp(),  # gated MLP
    ):
        plan, kept = recompute.source(x)
        assert torch.equal(recompute.rebuild(plan, kept), x)
        assert all(t.requires_grad or t.numel() <= 16 or t.grad_fn is not None for t in kept)


def test_source_falls_back_when_not_recognised_or_hooks_active():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8)
    assert recompute.source(torch.randn(4, 8)) is None  # no producer
    assert recompute.source(h) is None  # a leaf
    assert recompute.source(h.exp()) is None  # not a product
    assert recompute.source(h * 2.0) is None  # a product with a Python number (MulBackward1)
    assert recompute.source(w * (h + 1).exp()) is None  # the unsaved operand is not a product
    assert recompute.source((h * h).double() * w.double()) is None  # the cast's source dtype is ambiguous
    a = h * 1.0
    x = a * h
    a.mul_(3)  # an operand modified in place: what it held is gone
    assert recompute.source(x) is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert recompute.source(w * (h * h)) is None
    assert recompute.source(w * (h * h)) is not None


def test_checkpointing_and_opt_out_save_x(ids):
    model = _adapted(tiny_llama)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    out, grads, _ = _step(model, ids)
    set_recompute(model, False)
    model.gradient_checkpointing_disable()
    out_s, grads_s, nodes = _step(model, ids)
    assert all(n.plan is None for n in nodes) and nodes
    torch.testing.assert_close(out, out_s, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_s[n], rtol=1e-5, atol=1e-6, msg=n)
    set_recompute(model, True)
    assert all(layer.recompute_input for _, layer in lorakit.adapters.lora_layers(model))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_offload_activations_is_exact_and_leaves_parameters(make, ids):
    """Inside offload_activations every saved activation is a copy (on CPU here: the same path a GPU takes,
    minus the device): gradients equal those without it, bit for bit; no parameter is copied; a tensor
    saved by several nodes is copied once. (Inside, LoRA inputs are saved, not rebuilt: same values.)"""
    model = _adapted(make).eval()
    out, grads, _ = _step(model, ids)
    packs = []
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ctx = offload_activations(model, min_bytes=0)
    real_pack = ctx.pack_hook
    ctx.pack_hook = lambda t: packs.append(t) or real_pack(t)
    with ctx:
        out_o = model(ids).logits
    out_o.float().square().mean().backward()
    grads_o = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(out, out_o.detach())
    for n in grads:
        assert torch.equal(grads[n], grads_o[n]), n
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copied = [t for t in packs if t.untyped_storage().data_ptr() not in params and t.numel() > 0]
    assert ctx.stats["tensors"] > 10 and ctx.stats["bytes"] > 0
    assert ctx.stats["kept"] >= len(packs) - len(copied)  # every parameter stayed
    if make is tiny_llama:  # h is saved by the RMSNorm's pow and its mul: copied once
        assert ctx.stats["tensors"] < len(copied)


def test_plan_shape_and_dtype_are_torchs_broadcasting_and_promotion():
    """_meta computes a plan's result shape and dtype in Python: the same as torch's, on every pair here."""
    import itertools

    shapes = [(), (1,), (3,), (2, 1), (1, 3), (2, 3), (0,), (2, 0), (4, 1, 3), (5,)]
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for sa, sb in itertools.product(shapes, shapes):
        kept = [torch.empty(sa, dtype=torch.float16, device="meta"), torch.empty(sb, device="meta")]
        try:
            want = (tuple(torch.broadcast_shapes(sa, sb)), torch.result_type(*kept))
        except RuntimeError:
            want = None
        assert recompute._meta(("mul", ("t", 0), ("t", 1)), kept) == want, (sa, sb)
    for da, db in itertools.product(dtypes, dtypes):
        for sa, sb in [((2, 3), (3,)), ((), (3,)), ((2, 3), ())]:
            kept = [torch.empty(sa, dtype=da, device="meta"), torch.empty(sb, dtype=db, device="meta")]
            assert recompute._meta(("mul", ("t", 0), ("t", 1)), kept)[1] == torch.result_type(*kept)
