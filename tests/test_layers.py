"""Properties of every layer type × option, each against a plain reference or an exact identity.

The reference computes the LoRA output from the raw tensors with plain torch ops (not through
lorakit.functional), so a mistake in the shared math module cannot hide behind itself.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import randomize_adapters
from lorakit.adapters import lora_layers


class One(nn.Module):
    """A model holding one layer of the kind under test, so targets=["layer"] picks exactly it."""

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        self.layer = {
            "linear": lambda: nn.Linear(12, 10),
            "linear-nobias": lambda: nn.Linear(12, 10, bias=False),
            "conv1d": lambda: Conv1D(10, 12),  # GPT-2: nf=10 outputs, nx=12 inputs, weight stored (12, 10)
            "embedding": lambda: nn.Embedding(20, 10, padding_idx=0),
            "conv2d": lambda: nn.Conv2d(3, 5, 3, padding=1, stride=2),
        }[kind]()

    def forward(self, x):
        return self.layer(x)

    def inputs(self):
        g = torch.Generator().manual_seed(11)
        if self.kind == "embedding":
            return torch.randint(0, 20, (3, 7), generator=g)
        if self.kind == "conv2d":
            return torch.randn(2, 3, 7, 7, generator=g)
        return torch.randn(3, 4, 12, generator=g)


KINDS = ["linear", "linear-nobias", "conv1d", "embedding", "conv2d"]
OPTIONS = {
    "plain": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=3, use_rslora=True),
    "gaussian": dict(r=2, alpha=5, init="gaussian"),
    "rank-pattern": dict(r=4, alpha=8, rank_pattern={"layer": 3}, alpha_pattern={"layer": 7}),
    "dora": dict(r=4, alpha=8, use_dora=True),
}
CASES = [
    (k, o)
    for k in KINDS
    for o in OPTIONS
    if not (o == "dora" and k in ("embedding", "conv2d"))  # DoRA is for Linear-shaped layers
]


def make(kind, option, randomize=True):
    model = One(kind)
    lorakit.add_adapter(model, lorakit.LoraConfig(targets=["layer"], **OPTIONS[option]))
    if randomize:
        randomize_adapters(model, std=0.2)
    return model


def reference(model, x, name="default"):
    """base(x) + ΔW applied by hand from the raw tensors (DoRA: m / ||W + ΔW|| · (W + ΔW) x + b)."""
    layer = model.layer
    w = layer.lora[name]
    A, B = w.A.detach(), w.B.detach()
    s = w.alpha / (math.sqrt(w.r) if w.use_rslora else w.r)
    with lorakit.disable_adapters(model), torch.no_grad():
        base = model(x)
    if model.kind == "embedding":
        return base + s * (A.t()[x] @ B.t())
    if model.kind == "conv2d":
        h = F.conv2d(x, A, stride=layer.stride, padding=layer.padding)
        return base + s * F.conv2d(h, B)
    W = layer.weight.detach().t() if model.kind == "conv1d" else layer.weight.detach()  # (out, in)
    delta = s * B @ A
    if w.magnitude is None:
        return base + x @ delta.t()
    merged = (w.magnitude.detach() / (W + delta).norm(dim=1)).unsqueeze(1) * (W + delta)
    bias = layer.bias.detach() if layer.bias is not None else 0
    return x @ merged.t() + bias


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_output_matches_plain_reference(kind, option):
    model = make(kind, option)
    x = model.inputs()
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, reference(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_fresh_adapter_and_disabled_give_exact_base(kind, option):
    model = One(kind)
    x = model.inputs()
    with torch.no_grad():
        base = model(x)
        lorakit.add_adapter(model, lorakit.LoraConfig(targets=["layer"], **OPTIONS[option]))
        assert torch.equal(model(x), base)  # B = 0 (Embedding: A = 0) at init
        randomize_adapters(model, std=0.2)
        assert not torch.allclose(model(x), base)
        with lorakit.disable_adapters(model):
            assert torch.equal(model(x), base)
        assert not torch.allclose(model(x), base)  # enabled again on exit


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_merge_matches_and_unmerge_restores(kind, option):
    model = make(kind, option)
    x = model.inputs()
    W = model.layer.weight.detach().clone()
    with torch.no_grad():
        y = model(x)
        lorakit.merge(model)
        assert lorakit.is_merged(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="already merged"):
            lorakit.merge(model)
        lorakit.unmerge(model)
    torch.testing.assert_close(model.layer.weight, W, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_unload_merged_is_plain_module_with_same_output(kind, option):
    model = make(kind, option)
    x = model.inputs()
    with torch.no_grad():
        y = model(x)
    base_cls = type(One(kind).layer)
    plain = lorakit.unload(model, merge=True)
    assert type(plain.layer) is base_cls
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in One(kind).named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_save_load_bit_exact(kind, option, tmp_path):
    model = make(kind, option)
    x = model.inputs()
    lorakit.save_adapter(model, tmp_path)
    fresh = One(kind)
    lorakit.load_adapter(fresh, tmp_path)
    for (n, p), (m, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(("kind", "option"), [c for c in CASES if c[1] != "dora"])
def test_two_active_adapters_add_their_deltas(kind, option):
    model = make(kind, option)
    lorakit.add_adapter(model, lorakit.LoraConfig(targets=["layer"], **OPTIONS[option]), name="b")
    randomize_adapters(model, std=0.2, seed=5)
    x = model.inputs()
    with torch.no_grad():
        with lorakit.disable_adapters(model):
            base = model(x)
        lorakit.set_adapter(model, "default")
        ya = model(x)
        lorakit.set_adapter(model, "b")
        yb = model(x)
        lorakit.set_adapter(model, ["default", "b"])
        both = model(x)
    torch.testing.assert_close(both, base + (ya - base) + (yb - base), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_gradients_reach_only_active_adapter(kind, option):
    model = make(kind, option)
    lorakit.add_adapter(model, lorakit.LoraConfig(targets=["layer"], r=2), name="idle", activate=False)
    model.train()
    model(model.inputs()).square().sum().backward()
    for n, p in model.named_parameters():
        should = ".lora.default." in n
        assert (p.grad is not None) == should, n
        if should:
            assert p.grad.abs().sum() > 0, n


def test_delete_adapter_restores_plain_layer():
    model = One("linear")
    lorakit.add_adapter(model, lorakit.LoraConfig(targets=["layer"], r=2))
    lorakit.delete_adapter(model, "default")
    assert type(model.layer) is nn.Linear
    assert not lorakit.adapter_records(model) and not list(lora_layers(model))
    with pytest.raises(KeyError, match="no adapter named"):
        lorakit.set_adapter(model, "default")


def test_dora_refused_on_embedding_with_module_name():
    with pytest.raises(ValueError, match="layer"):
        lorakit.add_adapter(One("embedding"), lorakit.LoraConfig(targets=["layer"], use_dora=True))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, "LoraConfig.r=0"),
        ("r", -3, "positive integer"),
        ("alpha", float("nan"), "LoraConfig.alpha"),
        ("dropout", 1.0, "LoraConfig.dropout"),
        ("init", "eva", "LoraConfig.init"),
        ("bias", "some", "LoraConfig.bias"),
        ("targets", "(", "not a valid regex"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ],
)
def test_invalid_config_values_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        lorakit.LoraConfig(**{field: value})


def test_unsupported_layer_type_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

    with pytest.raises((TypeError, ValueError), match="LayerNorm"):
        lorakit.add_adapter(Odd(), lorakit.LoraConfig(targets=["norm"]))
