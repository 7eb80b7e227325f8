"""Fused sibling projections (fast/fused.py): the hand-over lives only inside the parent's call.

The parent (a Llama attention block) gets a stand-in forward where a test needs another call pattern; the
group's hooks are on the parent module, so they run around whatever its forward does."""

from __future__ import annotations

import weakref

import pytest
import torch

import lorakit
import lorakit.fast.fused as FF
from conftest import randomize_adapters, tiny_llama
from lorakit.fast import plain_path


def _attention(seed: int = 0):
    model = tiny_llama(seed).train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"]))
    randomize_adapters(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused is not None
    return model, attn


def _record_calls(monkeypatch) -> list:
    """Each fused.lora_linear_train call as (number of layers, weakrefs to its outputs)."""
    calls = []
    real = FF.lora_linear_train

    def recording(x, layers, *args):
        outs = real(x, layers, *args)
        calls.append((len(layers), [weakref.ref(y) for y in outs]))
        return outs

    monkeypatch.setattr(FF, "lora_linear_train", recording)
    return calls


def _x(attn, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, attn.q_proj.in_features, generator=g).requires_grad_(True)


def test_outputs_not_held_after_the_parent_returns(monkeypatch):
    """A parent calling only q and k: the group computed v's output too, and nothing keeps it afterwards."""
    _, attn = _attention()
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(attn, "forward", lambda x: (attn.q_proj(x), attn.k_proj(x)))
    x = _x(attn)
    yq, yk = attn(x)
    assert [n for n, _ in calls] == [3]  # q computed q, k and v in one call
    q_ref, k_ref, v_ref = calls[0][1]
    assert q_ref() is yq and k_ref() is yk
    assert v_ref() is None  # v's output died with the parent's scope
    assert attn.q_proj.fused.scope is None
    (yq.square().sum() + yk.sum()).backward()
    with plain_path():
        x2 = x.detach().clone().requires_grad_(True)
        ref = attn.q_proj(x2).square().sum() + attn.k_proj(x2).sum()
    torch.testing.assert_close(x.grad, torch.autograd.grad(ref, x2)[0], rtol=1e-5, atol=1e-6)


def test_an_exception_in_the_parent_leaves_no_open_scope(monkeypatch):
    _, attn = _attention()
    calls = _record_calls(monkeypatch)

    def failing(x):
        attn.q_proj(x)
        raise RuntimeError("boom")

    monkeypatch.setattr(attn, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        attn(_x(attn))
    assert attn.q_proj.fused.scope is None
    assert [n for n, _ in calls] == [3] and all(r() is None for r in calls[0][1])


def test_a_sibling_called_outside_its_parent_computes_alone(monkeypatch):
    """q, k, v called directly (no parent call, no scope): three single calls, each the plain math."""
    _, attn = _attention()
    calls = _record_calls(monkeypatch)
    x = _x(attn)
    ys = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert [n for n, _ in calls] == [1, 1, 1]
    sum(y.square().sum() for y in ys).backward()
    with plain_path():
        x2 = x.detach().clone().requires_grad_(True)
        refs = [attn.q_proj(x2), attn.k_proj(x2), attn.v_proj(x2)]
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
    ref_dx = torch.autograd.grad(sum(r.square().sum() for r in refs), x2)[0]
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-6)


def test_inside_the_parent_another_input_computes_alone(monkeypatch):
    """q(x), k(other), v(x) in one parent call: k computes alone, v takes the output q's call made for it."""
    _, attn = _attention()
    calls = _record_calls(monkeypatch)
    other = _x(attn, seed=4)
    monkeypatch.setattr(attn, "forward", lambda x: (attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)))
    x = _x(attn)
    ys = attn(x)
    assert [n for n, _ in calls] == [3, 1]
    assert calls[0][1][2]() is ys[2]  # v's output is the one computed with q's
    with plain_path():
        refs = [attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)]
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)


def test_checkpointing_fuses_in_the_rerun_and_closes_every_scope(monkeypatch, ids):
    """The checkpointed re-run of each decoder layer (stopped early by torch once it has what it needs)
    opens its own scopes; after backward none is open."""
    model, _ = _attention()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    calls = _record_calls(monkeypatch)
    loss = model(ids).logits.square().mean()
    assert [n for n, _ in calls] == [3, 3]
    loss.backward()
    assert [n for n, _ in calls] == [3, 3, 3, 3]
    assert all(g.scope is None for g in model.__dict__["lorakit_fused"])


def test_groups_are_linked_once_and_unlinked_with_the_adapters():
    """The hooks are state set by add/delete/unload: one pair per group's parent, gone with the adapters."""
    model, attn = _attention()
    mlp = model.model.layers[0].mlp

    def hooks(m):
        return len(m._forward_pre_hooks), len(m._forward_hooks)

    assert hooks(attn) == (1, 1) and hooks(mlp) == (0, 0)  # only q/k/v carry adapters
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets="all-linear"), name="b")
    assert hooks(attn) == (1, 1) and hooks(mlp) == (1, 1)  # relinked, not stacked
    lorakit.delete_adapter(model, "b")
    assert hooks(attn) == (1, 1) and hooks(mlp) == (0, 0)
    lorakit.unload(model, merge=False)
    assert hooks(attn) == (0, 0) and "lorakit_fused" not in model.__dict__
