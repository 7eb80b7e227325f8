"""A transformers model with lorakit adapters keeps working as a transformers model: generate, gradient
checkpointing, Trainer; and the per-row path equals running each adapter on its own rows."""

import pytest
import torch

import lorakit
from conftest import randomize_adapters, rows_alone, tiny_gpt2, tiny_llama

T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _greedy_by_hand(model, ids, steps, eos=2, pad=0):
    """Greedy decoding with full forwards and no cache (a row that emitted EOS gets pads after it): the
    reference for `generate`."""
    done = torch.zeros(len(ids), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generate_with_adapter_equals_greedy_reference_and_merged(make, ids):
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    randomize_adapters(model, std=0.3)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_by_hand(model, ids, 6))
    with lorakit.disable_adapters(model):
        base = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, base)  # the adapter changes what is generated
    lorakit.merge(model)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), out)


def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2 has dropout in train mode: the same masks in both runs
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_gradient_checkpointing_gives_same_gradients(make, ids):
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, dropout=0.0))
    randomize_adapters(model)
    model.train()
    plain = _lora_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # the base is frozen: checkpointed blocks need a grad-requiring input
    checkpointed = _lora_grads(model, ids)
    assert plain.keys() == checkpointed.keys() and plain
    assert all(".lora." in n for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    # The tiny random head caps logits near ±0.6, so LoRA alone barely moves the loss: the head trains too.
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=T, modules_to_save=["lm_head"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 40, (16,), generator=g)} for _ in range(4)]
    data = [dict(r, labels=r["input_ids"]) for r in rows for _ in range(8)]

    def loss_on(model):
        with torch.no_grad():
            return sum(model(**{k: v[None] for k, v in d.items()}).loss.item() for d in data[::8])

    before = loss_on(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=1e-2,
        num_train_epochs=4, report_to=[], save_strategy="no", logging_steps=50, use_cpu=True, seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    after = loss_on(model)
    assert after < 0.5 * before, (before, after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    x = data[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


def _two_adapters():
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=T), name="a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=3, targets=["q_proj", "v_proj"]), name="b")
    randomize_adapters(model, std=0.2)
    return model


def test_per_row_adapters_equal_each_adapter_alone(ids):
    model = _two_adapters()
    batch = torch.cat([ids, ids.flip(0)])  # 4 rows
    names = ["a", "b", None, "a"]
    expected = rows_alone(model, batch, names)
    with torch.no_grad(), lorakit.per_row_adapters(model, names):
        mixed = model(batch).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the plan is gone on exit: the active adapter applies to every row again
        lorakit.set_adapter(model, "b")
        after = model(batch).logits
    torch.testing.assert_close(after[1:2], expected[1:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[2:3], expected[2], atol=1e-3)  # the base row inside the plan gets "b" now


def test_per_row_refuses_unknown_names_and_merged(ids):
    model = _two_adapters()
    with pytest.raises(KeyError, match="nope"), lorakit.per_row_adapters(model, ["a", "nope"]):
        pass
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), lorakit.per_row_adapters(model, ["a", None]):
        pass
