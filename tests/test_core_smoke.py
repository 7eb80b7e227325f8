"""First checks of the core API on tiny Llama / GPT-2 models."""

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_b_zero_is_base_and_names_unchanged(make, ids):
    model = make()
    base = model(ids).logits
    names = [n for n, _ in model.named_parameters()]
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    assert torch.equal(model(ids).logits, base)
    assert [n for n, _ in model.named_parameters() if ".lora." not in n] == names


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_disable(make, ids):
    model = make()
    base = model(ids).logits
    W = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    randomize_adapters(model)
    y = model(ids).logits
    assert (y - base).abs().max() > 1e-3
    with lorakit.disable_adapters(model):
        assert torch.equal(model(ids).logits, base)
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        lorakit.merge(model)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in W:
            torch.testing.assert_close(p, W[n], atol=1e-6, rtol=0)


def test_trainable_only_adapters(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    count = lorakit.trainable_parameters(model)
    assert 0 < count.trainable < count.total
    assert "trainable params" in str(count)
    model(ids).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora." in n), n


def test_unknown_target_names_nearest():
    model = tiny_llama()
    with pytest.raises(ValueError, match="q_proj"):
        lorakit.add_adapter(model, lorakit.LoraConfig(targets=["q_prj"]))
    assert not lorakit.adapter_records(model)
