"""torch.compile(fullgraph=True) over a model with adapters: no graph breaks, the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama


@pytest.mark.slow  # an inductor compile of forward and backward: tens of seconds on 2 CPU cores
def test_lora_model_compiles_fullgraph_and_matches_eager(ids):
    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)

    def loss_of(m):
        return m(ids).logits.float().square().mean()

    ref = loss_of(model)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")  # a graph break raises here
    out = loss_of(compiled)
    grads = torch.autograd.grad(out, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
