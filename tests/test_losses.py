"""causal_lm_loss: the plain loss against transformers' own, the chunked loss against the plain one (values and
gradients) for every kind of output head, and the promise that no N×V tensor is kept for backward."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.losses import causal_lm_loss


def _batch(seed: int = 0, b: int = 2, t: int = 40, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0  # right padding on row 1
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :5] = -100  # a prompt without loss
    return ids, mask, labels


def _loss_and_grads(model, chunk, batch):
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, *batch, chunk=chunk)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


def _assert_same(model, batch, chunk, atol=1e-5):
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, 0, batch)
    loss, n, grads = _loss_and_grads(model, chunk, batch)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=atol)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=atol, msg=k)


def test_plain_loss_is_transformers_loss():
    model = tiny_llama()
    ids, mask, labels = _batch()
    loss, n = causal_lm_loss(model, ids, mask, labels)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss / n, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("tie", [False, True])
def test_chunked_equals_plain_with_lora(chunk, tie):
    model = tiny_llama(tie=tie).train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    _assert_same(model, _batch(), chunk)


def test_chunked_gpt2_and_trainable_head_weight():
    model = tiny_gpt2()  # eval: GPT-2's own dropout would draw differently in the two runs
    _assert_same(model, _batch(), 9)  # full fine-tuning: the tied head / embedding weight gets dW
    assert model.lm_head.weight.requires_grad


def test_chunked_head_with_bias():
    model = tiny_llama()
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    torch.nn.init.normal_(model.lm_head.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    model.model.norm.weight.requires_grad_(True)  # so dh flows too
    _assert_same(model, _batch(), 13)


@pytest.mark.parametrize(
    "cfg",
    [
        {"targets": ["q_proj", "lm_head"]},  # LoRA on the head
        {"targets": ["v_proj"], "modules_to_save": ["lm_head"]},  # a trainable copy of the head
    ],
)
def test_chunked_adapted_head(cfg):
    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.0, **cfg))
    randomize_adapters(model)
    _assert_same(model, _batch(), 11)


def test_chunked_trainable_tokens_on_tied_head():
    model = tiny_llama(tie=True).train()
    lorakit.add_adapter(
        model, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj"], trainable_token_indices=[5, 9, 40])
    )
    randomize_adapters(model)
    assert model.lm_head.tokens  # the tied head follows the new rows
    _assert_same(model, _batch(), 10)


def test_chunked_lora_head_with_dropout_replays_the_mask():
    # Checkpointing must replay the head's dropout mask in backward. Reference: the same chunks, same RNG
    # order, through plain autograd (no checkpoint).
    import torch.nn.functional as F

    model = tiny_llama().train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.3, targets=["lm_head"]))
    randomize_adapters(model)
    ids, mask, labels = batch = _batch()
    torch.manual_seed(3)
    loss, _, grads = _loss_and_grads(model, 8, batch)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    hidden = model.model(input_ids=ids, attention_mask=mask)[0]
    y = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[y != -100]
    y = y[y != -100]
    ref = sum(F.cross_entropy(model.lm_head(h[s : s + 8]).float(), y[s : s + 8], reduction="sum")
              for s in range(0, len(y), 8))  # fmt: skip
    (ref / len(y)).backward()
    torch.testing.assert_close(loss, ref.detach())
    for k, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[k].grad, msg=k)


def test_bf16_chunked_close_to_plain():
    model = tiny_llama().to(torch.bfloat16).train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    ref_loss, _, ref_grads = _loss_and_grads(model, 0, _batch())
    loss, _, grads = _loss_and_grads(model, 16, _batch())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=5e-2, atol=5e-3, msg=k)


def _largest_saved(model, chunk, batch) -> int:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = causal_lm_loss(model, *batch, chunk=chunk)
    loss.backward()
    return max(sizes)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "lm_head"]])
def test_chunked_never_saves_full_logits(targets):
    model = tiny_llama(vocab=512).train()  # V large next to the hidden sizes, as in real models
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets=targets))
    batch = _batch(b=2, t=60)
    n_by_v = 2 * 59 * 512
    assert _largest_saved(model, 0, batch) >= n_by_v  # the plain loss keeps the logits: the probe works
    assert _largest_saved(model, 16, batch) < n_by_v / 4


def test_no_grad_eval_chunked():
    model = tiny_llama()
    batch = _batch()
    with torch.no_grad():
        plain, n0 = causal_lm_loss(model, *batch)
        chunked, n1 = causal_lm_loss(model, *batch, chunk=5)
    assert n0 == n1
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)


def test_fallback_when_the_model_rescales_logits():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # as Gemma-2 would: the head alone is not the logits
    batch = _batch()
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        loss, _ = causal_lm_loss(model, *batch, chunk=8)
    torch.testing.assert_close(loss, causal_lm_loss(model, *batch)[0])


def test_fallback_with_per_row_head():
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["lm_head"]))
    randomize_adapters(model)
    batch = _batch()
    with lorakit.per_row_adapters(model, ["default", None]), torch.no_grad():
        with pytest.warns(UserWarning, match="per-row"):
            loss, _ = causal_lm_loss(model, *batch, chunk=8)
        ref, _ = causal_lm_loss(model, *batch)
    torch.testing.assert_close(loss, ref)


def test_bad_arguments():
    model = tiny_llama()
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="chunk"):
        causal_lm_loss(model, ids, mask, labels, chunk=-1)
    with pytest.raises(ValueError, match="shape"):
        causal_lm_loss(model, ids, mask, labels[:, :-1])
