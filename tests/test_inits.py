"""OLoRA and LoftQ (lorakit.inits): against PEFT's initialisation on the same weights, and their identities."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import bnb_unusable, tiny_llama
from lorakit.inits import loftq_factors, nf4_roundtrip, olora_factors

TARGETS = ["q_proj", "v_proj"]


def test_olora_equals_peft_on_the_same_weights(ids, tmp_path):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    ours = tiny_llama()
    lorakit.add_adapter(ours, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, init="olora"))
    peft = get_peft_model(
        tiny_llama(), PeftConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    )
    for n, layer in lorakit.adapters.lora_layers(ours):
        ref = peft.base_model.model.get_submodule(n)
        w = layer.lora["default"]
        torch.testing.assert_close(w.A, ref.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(w.B, ref.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.weight, ref.base_layer.weight, atol=1e-6, rtol=0)
    base = tiny_llama()
    with torch.no_grad():
        # The output is unchanged at init, and equals PEFT's.
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids).logits, peft(ids).logits, atol=1e-5, rtol=0)
        # Saved as plain LoRA for the untouched base (like PiSSA): base + file = the initialised model.
        lorakit.save_adapter(ours, tmp_path)
        fresh = tiny_llama()
        lorakit.load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_olora_factors_are_qr():
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    A, B = olora_factors(W, 3)
    torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-6, rtol=0)  # orthonormal columns
    assert torch.all(A.tril(-1) == 0)  # R is upper triangular
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(B @ A, Q[:, :3] @ R[:3])


@pytest.mark.skipif(bool(bnb_unusable()), reason=bnb_unusable() or "ok")
def test_loftq_identities():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    r, s = 8, 2.0
    A, B, Q = loftq_factors(W, r, s, num_iter=1)
    plain = nf4_roundtrip(W)
    # One iteration: Q = NF4(W) and s·BA = the best rank-r approximation of the quantization error.
    torch.testing.assert_close(Q, plain)
    U, S, Vh = torch.linalg.svd(W - plain, full_matrices=False)
    torch.testing.assert_close(s * B @ A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-5, rtol=0)
    # Q is NF4-representable (quantizing the base again is exact), and Q + s·BA is closer to W than NF4(W).
    torch.testing.assert_close(nf4_roundtrip(Q), Q, atol=0, rtol=0)
    err = lambda A, B, Q: float((W - Q - s * B @ A).norm())  # noqa: E731
    assert err(A, B, Q) < 0.97 * float((W - plain).norm())
    # More iterations never do worse here (LoftQ's alternating minimisation).
    A5, B5, Q5 = loftq_factors(W, r, s, num_iter=5)
    assert err(A5, B5, Q5) <= err(A, B, Q) + 1e-6
    torch.testing.assert_close(nf4_roundtrip(Q5), Q5, atol=0, rtol=0)


@pytest.mark.skipif(bool(bnb_unusable()), reason=bnb_unusable() or "ok")
def test_loftq_adapter_replaces_the_base_by_nf4_values():
    from lorakit.inits import residual_factors

    model = tiny_llama()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, init="loftq"))
    layer = model.model.layers[0].self_attn.q_proj
    A, B, Q, keep = residual_factors("loftq", W, 4, 2.0)
    assert not keep and layer.lora["default"].pissa_init is None
    torch.testing.assert_close(layer.weight, Q, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora["default"].A, A, atol=0, rtol=0)
    delta = layer.weight + 2.0 * layer.lora["default"].B @ layer.lora["default"].A
    assert float((delta - W).norm()) < float((nf4_roundtrip(W) - W).norm())


def test_residual_inits_refused_with_dora_and_saved_as_default(tmp_path):
    with pytest.raises(ValueError, match="init"):
        lorakit.LoraConfig(r=2, init="olora", use_dora=True)
    cfg = lorakit.LoraConfig(r=2, targets=TARGETS, init="olora")
    assert cfg.to_peft_dict()["init_lora_weights"] is True
    assert (
        lorakit.LoraConfig.from_peft_dict({**cfg.to_peft_dict(), "init_lora_weights": "loftq"}).init
        == "default"
    )


def test_train_init_option(tmp_path):
    from conftest import tiny_tokenizer
    from lorakit.train import TrainConfig
    from lorakit.train.prepare import prepare

    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    p = prepare(TrainConfig(model=str(tmp_path), rank=2, targets="q_proj", init="olora"))
    layer = p.model.model.layers[0].self_attn.q_proj
    assert p.lora_config.init == "olora" and layer.lora["default"].B.abs().sum() > 0  # B = Q, not zeros
    with pytest.raises(ValueError, match="--init loftq .* drop --quantize"):
        TrainConfig(init="loftq", quantize="4bit")


def peft_loftq_init_on_cpu():
    """PEFT's own `loftq_init`, run on the CPU: its source with only the hard-coded compute device changed.

    PEFT 0.21 runs LoftQ on CUDA / XPU only (`compute_device = "xpu" if ... else "cuda"`); bitsandbytes >= 0.45
    quantizes NF4 on the CPU too, so the rest of PEFT's code (bnb's Params4bit quantize, dequantize_4bit, SVD,
    the alternation) runs unchanged. Fails loudly if that line changes in a later PEFT.
    """
    import inspect

    import peft.utils.loftq_utils as lu

    src = inspect.getsource(lu.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in src, "PEFT's loftq_init changed: update this test's CPU patch"
    namespace = dict(vars(lu))
    exec(src.replace(line, 'compute_device = "cpu"'), namespace)
    return namespace["loftq_init"]


@pytest.mark.skipif(bool(bnb_unusable()), reason=bnb_unusable() or "ok")
@pytest.mark.parametrize("num_iter", [1, 3])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_loftq_factors_equal_peft_on_the_same_weights(num_iter, scale):
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    Q_ref, A_ref, B_ref = peft_loftq_init_on_cpu()(W, num_bits=4, reduced_rank=8, num_iter=num_iter)
    A, B, Q = loftq_factors(W, 8, scale, num_iter)
    torch.testing.assert_close(Q, Q_ref, atol=1e-6, rtol=0)  # the same NF4 residual base
    # PEFT fits B_ref A_ref to W - Q ignoring the scaling s (exact only when lora_alpha = r); lorakit divides
    # the factors by s, so s·B A = B_ref A_ref: each factor is PEFT's over √s (the split is the same √S).
    torch.testing.assert_close(A * scale**0.5, A_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(B * scale**0.5, B_ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(bool(bnb_unusable()), reason=bnb_unusable() or "ok")
def test_loftq_model_equals_peft_on_the_same_weights(ids, monkeypatch):
    import peft.tuners.lora.layer as peft_layer
    from peft import LoftQConfig, get_peft_model
    from peft import LoraConfig as PeftConfig

    monkeypatch.setattr(peft_layer, "loftq_init", peft_loftq_init_on_cpu())  # imported there by name
    ours = tiny_llama()  # alpha = r: s = 1, where PEFT's init is the LoftQ fit (see the factor test above)
    lorakit.add_adapter(ours, lorakit.LoraConfig(r=4, alpha=4, targets=TARGETS, init="loftq"))
    cfg = PeftConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq", loftq_config=LoftQConfig(4, 1)
    )
    peft = get_peft_model(tiny_llama(), cfg)
    for n, layer in lorakit.adapters.lora_layers(ours):
        ref = peft.base_model.model.get_submodule(n)
        torch.testing.assert_close(layer.weight, ref.base_layer.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora["default"].A, ref.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora["default"].B, ref.lora_B["default"].weight, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft(ids).logits, atol=1e-5, rtol=0)
