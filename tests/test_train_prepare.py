"""lorakit.train.prepare: new tokens, trainable embeddings, k-bit set-up, and load_model(adapter=)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import bnb_unusable, quantizable_llama_dir, randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit import load_adapter
from lorakit.models import load_model
from lorakit.train.config import TrainConfig
from lorakit.train.prepare import parse_targets, prepare, save_prepared
from lorakit.vocab import grow_embeddings, read_new_tokens

TEXT = "ab<x1>c<x2>zzq<x1>"


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok), tie=request.param)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "new.txt").write_text("<x1>\n<x2>\nzzq\n")
    return tmp_path, request.param


def _ids(tokenizer, text=TEXT):
    return torch.tensor([tokenizer(text)["input_ids"]])


def _file_keys(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_new_tokens_only_new_rows_train(base_dir):
    tmp, tied = base_dir
    p = prepare(TrainConfig(model=str(tmp / "base"), new_tokens=str(tmp / "new.txt"), rank=4))
    assert p.new_token_ids == [102, 103, 104]
    emb = p.model.get_input_embeddings()
    assert emb.num_embeddings == 105 and p.model.config.vocab_size == 105
    old = emb.weight[:102].detach().double().mean(0)
    assert torch.equal(emb.weight[102:].detach(), old.float().expand(3, -1))  # deterministic mean rows
    ids = _ids(p.tokenizer)
    assert {102, 103, 104} <= set(ids[0].tolist())  # the new tokens are single tokens
    out = p.model(ids, labels=ids)
    out.loss.backward()
    trainable = {n for n, q in p.model.named_parameters() if q.requires_grad}
    assert all(".lora." in n or ".tokens." in n for n in trainable)
    token_params = sorted(n for n in trainable if ".tokens." in n)
    assert token_params == (
        ["model.embed_tokens.tokens.default.values"]
        if tied
        else ["lm_head.tokens.default.values", "model.embed_tokens.tokens.default.values"]
    )
    # Base rows get no gradient at all: the embedding / head weights are frozen, only the new rows train.
    for n, q in p.model.named_parameters():
        if n not in trainable:
            assert q.grad is None, n
    values = dict(p.model.named_parameters())["model.embed_tokens.tokens.default.values"]
    assert values.shape == (3, 32) and values.grad.abs().sum() > 0
    if tied:
        assert p.model.lm_head.tokens["default"] is emb.tokens["default"]


def test_new_tokens_round_trip_bit_exact(base_dir):
    tmp, tied = base_dir
    p = prepare(TrainConfig(model=str(tmp / "base"), new_tokens=str(tmp / "new.txt"), rank=4))
    randomize_adapters(p.model)
    out = save_prepared(p, tmp / "adapter")
    keys = [k for k in _file_keys(out) if ".lora_" not in k]
    # Only what changed: LoRA tensors and the new rows, never a full embedding.
    expected = ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    if not tied:
        expected.insert(0, "base_model.model.lm_head.token_adapter.trainable_tokens_delta")
    assert keys == expected
    assert (out / "tokenizer.json").is_file()

    model, tokenizer = load_model(str(tmp / "base"), adapter=out)
    ids = _ids(p.tokenizer)
    assert torch.equal(_ids(tokenizer), ids)
    assert tokenizer.convert_ids_to_tokens([102, 103, 104]) == ["<x1>", "<x2>", "zzq"]
    p.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, p.model(ids).logits)
    ref = dict(p.model.named_parameters())
    for n, q in model.named_parameters():
        assert torch.equal(q, ref[n]), n


def test_loaded_new_tokens_need_the_grown_base(base_dir):
    tmp, _ = base_dir
    p = prepare(TrainConfig(model=str(tmp / "base"), new_tokens=str(tmp / "new.txt"), rank=4))
    out = save_prepared(p, tmp / "adapter")
    plain, _ = load_model(str(tmp / "base"))  # not grown: the token ids are outside the embedding
    with pytest.raises(ValueError, match="outside"):
        load_adapter(plain, out)


def test_train_embeddings_saved_and_reloaded(base_dir):
    tmp, tied = base_dir
    p = prepare(TrainConfig(model=str(tmp / "base"), mode="cpt", train_embeddings=True, rank=4))
    assert p.lora_config.modules_to_save == (
        ["model.embed_tokens"] if tied else ["model.embed_tokens", "lm_head"]
    )
    ids = _ids(p.tokenizer, "hello world")
    p.model(ids, labels=ids).loss.backward()
    emb_copy = p.model.model.embed_tokens.lora_copies["default"]
    assert emb_copy.weight.grad is not None and emb_copy.weight.grad.abs().sum() > 0
    head_copy = p.model.lm_head.lora_copies["default"]
    assert (head_copy.weight is emb_copy.weight) == tied
    with torch.no_grad():
        emb_copy.weight.add_(0.05 * torch.randn_like(emb_copy.weight))
        if not tied:
            head_copy.weight.add_(0.05 * torch.randn_like(head_copy.weight))
    randomize_adapters(p.model)
    out = save_prepared(p, tmp / "adapter")
    full = [k for k in _file_keys(out) if ".lora_" not in k]
    # Tied or not, the head's weight is in the file (PEFT's ensure_weight_tying expects it when tied).
    assert full == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.get("ensure_weight_tying", False) == tied
    model, _ = load_model(str(tmp / "base"), adapter=out)
    p.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, p.model(ids).logits)
    if tied:
        assert (
            model.lm_head.lora_copies["default"].weight
            is model.model.embed_tokens.lora_copies["default"].weight
        )


def test_new_tokens_with_train_embeddings(base_dir):
    tmp, _ = base_dir
    cfg = TrainConfig(model=str(tmp / "base"), new_tokens=str(tmp / "new.txt"), train_embeddings=True, rank=4)
    p = prepare(cfg)
    assert p.lora_config.trainable_token_indices is None  # the whole (grown) embedding trains
    randomize_adapters(p.model)
    out = save_prepared(p, tmp / "adapter")
    model, tokenizer = load_model(str(tmp / "base"), adapter=out)
    ids = _ids(tokenizer)
    p.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, p.model(ids).logits)


@pytest.mark.parametrize(
    "text, where",
    [
        ("<a>\n\n<b>\n", ":2: blank line"),
        ("<a>\n<b>\n<a>\n", ":3: token '<a>' is listed twice (first on line 1)"),
        ("<a>\nq\n", ":2: token 'q' is already in the tokenizer's vocabulary"),
        ("", ": no tokens"),
    ],
)
def test_bad_new_tokens_file(tmp_path, text, where):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        read_new_tokens(path, tiny_tokenizer())
    assert f"{path}{where}" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_new_tokens(tmp_path / "missing.txt", tiny_tokenizer())


def test_grow_is_deterministic_and_keeps_rng():
    a, b = tiny_llama(vocab=100), tiny_llama(vocab=100)
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    assert grow_embeddings(a, 104) == [100, 101, 102, 103]
    assert torch.equal(torch.random.get_rng_state(), state)
    grow_embeddings(b, 104)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(a.lm_head.weight[100], a.lm_head.weight[:100].double().mean(0).float())
    assert grow_embeddings(a, 50) == []


def test_parse_targets():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(".*q_proj") == ".*q_proj"
    assert parse_targets(["q_proj"]) == ["q_proj"]


def test_gradient_checkpointing_gives_lora_grads(tmp_path):
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        p = prepare(TrainConfig(model=str(tmp_path / "base"), rank=4, gradient_checkpointing=gc))
        randomize_adapters(p.model)
        p.model.train()
        ids = _ids(p.tokenizer, "hello there")
        p.model(ids, labels=ids).loss.backward()
        grads.append({n: q.grad for n, q in p.model.named_parameters() if q.requires_grad})
    assert getattr(p.model, "is_activation_checkpointing", None) or p.model.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert grads[1][n] is not None and torch.allclose(g, grads[1][n], atol=1e-6), n


@pytest.mark.skipif(bool(bnb_unusable()), reason=bnb_unusable() or "ok")
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_prepare_and_backward(tmp_path, quantize):
    quantizable_llama_dir(tmp_path / "base")
    p = prepare(
        TrainConfig(model=str(tmp_path / "base"), rank=4, quantize=quantize, gradient_checkpointing=True)
    )
    q_proj = p.model.model.layers[0].self_attn.q_proj
    assert "Linear4bit" in type(q_proj).__name__ or "Linear8bitLt" in type(q_proj).__name__
    randomize_adapters(p.model)
    p.model.train()
    ids = _ids(p.tokenizer, "hello there")
    loss = p.model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert q_proj.lora["default"].A.grad.abs().sum() > 0
    assert q_proj.lora["default"].B.grad.abs().sum() > 0
    # Base weights stay frozen; the adapter saves and loads back onto a quantized base with equal outputs.
    assert not q_proj.weight.requires_grad
    out = save_prepared(p, tmp_path / "adapter")
    model, _ = load_model(str(tmp_path / "base"), quantize=quantize, adapter=out)
    p.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, p.model(ids).logits)


@pytest.mark.parametrize("train_embeddings", [False, True], ids=["new-rows", "full-embeddings"])
def test_peft_loads_prepared_adapters(base_dir, train_embeddings):
    from peft import PeftModel

    tmp, tied = base_dir
    cfg = TrainConfig(
        model=str(tmp / "base"), new_tokens=str(tmp / "new.txt"), rank=4, train_embeddings=train_embeddings
    )
    p = prepare(cfg)
    randomize_adapters(p.model)
    if train_embeddings:
        with torch.no_grad():
            copy = p.model.model.embed_tokens.lora_copies["default"].weight
            copy.add_(0.1 * torch.randn_like(copy))
    out = save_prepared(p, tmp / "adapter")
    base = tiny_llama(vocab=102, tie=tied)
    grow_embeddings(base, 105)  # PEFT users resize to len(tokenizer) first; the new rows are replaced anyway
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = _ids(p.tokenizer)
    p.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, p.model(ids).logits, atol=1e-5, rtol=0)


def test_tied_head_copy_must_match_embedding(tmp_path):
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok), tie=True).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    p = prepare(TrainConfig(model=str(tmp_path / "base"), train_embeddings=True, rank=4))
    out = save_prepared(p, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    save_file(tensors, str(out / "adapter_model.safetensors"))
    model, _ = load_model(str(tmp_path / "base"))
    with pytest.raises(ValueError, match="is tied to 'model.embed_tokens'"):
        load_adapter(model, out)
