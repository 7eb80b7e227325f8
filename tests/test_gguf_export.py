"""GGUF export checked against the real readers: transformers' GGUF loader (logits), the gguf package's reader
(every key and tensor llama.cpp's graph needs), and llama.cpp's LoRA arithmetic (alpha / r_B · B A per tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import lorakit  # noqa: E402
from conftest import randomize_adapters  # noqa: E402
from gguf_fixtures import tiny_causal_dir  # noqa: E402
from lorakit.gguf import export_gguf, export_gguf_lora, write_gguf  # noqa: E402
from lorakit.models import load_model  # noqa: E402

IDS = torch.randint(3, 264, (2, 11), generator=torch.Generator().manual_seed(0))
# A config every per-module rule applies to: rsLoRA, a rank pattern and an alpha pattern.
PATTERNED = dict(r=4, alpha=8, targets="all-linear", use_rslora=True, rank_pattern={"k_proj": 2},
                 alpha_pattern={"q_proj": 3.0})  # fmt: skip


def _adapter(tmp_path, model_type="llama", tie=False, **cfg):
    """(base dir, adapter dir, lorakit model with the adapter) for a tiny `model_type`."""
    base = tiny_causal_dir(tmp_path / f"base-{model_type}", model_type, tie)
    model, _ = load_model(str(base))
    lorakit.add_adapter(model, lorakit.LoraConfig(**(cfg or PATTERNED)))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter", model


def _gguf_logits(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return m(IDS).logits


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


# Against lorakit's fp32 model, as max |Δlogit| / max |logit|: f32 is exact up to fp32 summation order (the
# q/k row permutation is undone bit for bit); f16 rounds each weight to 11 bits, q8_0 to 8 bits per 32-value
# block. Tiny random models amplify weight error (measured here: f16 0.1-0.6 %, q8_0 2-10 %); the real default
# model's figures are in benchmarks/gguf_llama_cpp.py. Against the merged weights rounded the same way as the
# file stores them the match is tight (1e-5), which is what pins the export down.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.15}


def _rounded(model, quant):
    """`model` with every matrix rounded as the GGUF stores it (1-D tensors stay F32, as written)."""
    Q = gguf.GGMLQuantizationType
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2 or quant == "f32":
                continue
            if quant == "f16":
                p.copy_(p.half().float())
            else:
                q = gguf.quants.quantize(p.numpy(), Q.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, Q.Q8_0)).reshape(p.shape))
    return model


@pytest.mark.parametrize(
    "model_type,tie", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)]
)
def test_merged_gguf_in_transformers_gives_lorakit_logits(tmp_path, model_type, tie):
    base, adapter, model = _adapter(tmp_path, model_type, tie)
    with torch.no_grad():
        expected = model(IDS).logits
    for quant in ("f32", "f16", "q8_0"):
        with torch.no_grad():
            merged = lorakit.unload(load_model(str(base), adapter=adapter)[0], merge=True)
            rounded = _rounded(merged, quant)(IDS).logits
        report = export_gguf(str(base), adapter, tmp_path / f"m-{quant}.gguf", quant)
        got = _gguf_logits(report.output)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < TOLERANCE[quant], quant
        assert (got - rounded).abs().max().item() < 1e-5, quant
        assert report.arch == ("qwen2" if model_type == "qwen2" else "llama")


def _llama_cpp_keys(arch: str) -> set[str]:
    """The metadata llama.cpp reads for these architectures (llama-model.cpp load_hparams, llama-vocab.cpp)."""
    keys = {
        "general.architecture", "general.type", "general.file_type", "general.quantization_version",
        f"{arch}.context_length", f"{arch}.embedding_length", f"{arch}.block_count", f"{arch}.feed_forward_length",
        f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv",
        f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.rope.freq_base", f"{arch}.vocab_size",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
    }  # fmt: skip
    return keys | ({f"{arch}.rope.dimension_count"} if arch == "llama" else set())


def _llama_cpp_tensors(arch: str, n_layers: int, tied: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    per_block = "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down".split()
    for i in range(n_layers):
        names |= {f"blk.{i}.{n}.weight" for n in per_block}
        if arch == "qwen2":
            names |= {f"blk.{i}.attn_{n}.bias" for n in "qkv"}
    return names


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("qwen2", False)])
def test_gguf_round_trips_through_the_gguf_reader(tmp_path, model_type, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_causal_dir(tmp_path / "base", model_type, tie)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    arch = "qwen2" if model_type == "qwen2" else "llama"
    write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    reader, tensors = _read(tmp_path / "m.gguf")
    fields = reader.fields
    assert _llama_cpp_keys(arch) <= set(fields), _llama_cpp_keys(arch) - set(fields)
    assert set(tensors) == _llama_cpp_tensors(arch, 2, tie)
    c = model.config
    value = {k: fields[k].contents() for k in fields if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == arch and value["general.type"] == "model"
    assert value[f"{arch}.block_count"] == 2 and value[f"{arch}.embedding_length"] == c.hidden_size
    assert value[f"{arch}.attention.head_count_kv"] == c.num_key_value_heads
    assert value["tokenizer.chat_template"] == tok.chat_template
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert fields["tokenizer.ggml.merges"].contents() == ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    # transformers' Qwen2 tokenizer class brings its own split regex; the file names what the tokenizer does.
    assert fields["tokenizer.ggml.pre"].contents() == ("qwen2" if model_type == "qwen2" else "gpt-2")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    # ggml lists dims innermost first: a (out, in) matrix is [in, out]; norms stay F32, matrices F16.
    q = tensors["blk.0.attn_q.weight"]
    assert list(q.shape) == [c.hidden_size, c.hidden_size] and q.tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_tokenizer_from_the_gguf_tokenizes_as_the_original(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_causal_dir(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    write_gguf(AutoModelForCausalLM.from_pretrained(base), tok, tmp_path / "m.gguf", "f16")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "<|im_start|>user\nthe thin cat in a hat<|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_low_bit_quants_keep_embeddings_q8_and_fall_back_on_odd_rows(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    base = tiny_causal_dir(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    report = write_gguf(AutoModelForCausalLM.from_pretrained(base), tok, tmp_path / "q4.gguf", "q4_0")
    _, tensors = _read(report.output)
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert report.fallbacks == []
    # Rows of 48 values are not a multiple of the 32-value block: those matrices are written F16.
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    odd = write_gguf(AutoModelForCausalLM.from_config(cfg), tok, tmp_path / "odd.gguf", "q8_0")
    _, tensors = _read(odd.output)
    assert "blk.0.attn_q.weight" in odd.fallbacks and "blk.0.ffn_down.weight" not in odd.fallbacks
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_lora_gguf_applied_as_llama_cpp_does_gives_the_merged_weights(tmp_path, model_type):
    base, adapter, _ = _adapter(tmp_path, model_type)
    export_gguf(str(base), None, tmp_path / "base.gguf", "f32")
    export_gguf(str(base), adapter, tmp_path / "merged.gguf", "f32")
    info = export_gguf_lora(adapter, str(base), tmp_path / "lora.gguf")
    _, base_t = _read(tmp_path / "base.gguf")
    _, merged_t = _read(tmp_path / "merged.gguf")
    reader, lora_t = _read(tmp_path / "lora.gguf")
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert info["modules"] == 14 and len(lora_t) == 28
    for name, t in merged_t.items():
        w = np.array(base_t[name].data, dtype=np.float64)
        if f"{name}.lora_a" in lora_t:
            a, b = (np.array(lora_t[f"{name}.{s}"].data, dtype=np.float64) for s in ("lora_a", "lora_b"))
            w = w + alpha / b.shape[1] * (b @ a)  # llama-adapter.h get_scale: alpha / rank, rank = ne[0] of B
        np.testing.assert_allclose(w, np.array(t.data), atol=1e-6, err_msg=name)


def test_lora_gguf_metadata_is_what_llama_cpp_checks(tmp_path):
    base, adapter, _ = _adapter(tmp_path)
    export_gguf_lora(adapter, str(base), tmp_path / "lora.gguf")
    reader, tensors = _read(tmp_path / "lora.gguf")
    f = reader.fields
    assert f["general.type"].contents() == "adapter" and f["adapter.type"].contents() == "lora"
    assert f["general.architecture"].contents() == "llama"
    # llama.cpp reads the alpha with gguf_get_val_f32, which asserts FLOAT32.
    assert f["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    # ggml dims innermost first: A [in, r], B [r, out]; k_proj has rank 2 (rank_pattern).
    assert list(a.shape) == [64, 2] and list(b.shape) == [2, 32]


@pytest.mark.parametrize(
    "cfg,needle",
    [
        (dict(r=2, targets=["q_proj"], use_dora=True), "DoRA"),
        (dict(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(r=2, targets=["q_proj"], trainable_token_indices=[5, 6]), "trainable_token_indices"),
    ],
)
def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(tmp_path, cfg, needle):
    base, adapter, _ = _adapter(tmp_path, **cfg)
    with pytest.raises(ValueError, match=needle) as err:
        export_gguf_lora(adapter, str(base), tmp_path / "lora.gguf")
    assert "--format gguf" in str(err.value) and not (tmp_path / "lora.gguf").exists()
    # ... and the merged path carries it.
    export_gguf(str(base), adapter, tmp_path / "merged.gguf", "f32")


def test_lora_gguf_refuses_lm_head_of_a_tied_model(tmp_path):
    base, adapter, _ = _adapter(tmp_path, "llama", True, r=2, targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="tied"):
        export_gguf_lora(adapter, str(base), tmp_path / "lora.gguf")


def test_unsupported_architecture_and_quant_are_clear_errors(tmp_path):
    from conftest import tiny_gpt2
    from gguf_fixtures import byte_bpe_tokenizer

    with pytest.raises(ValueError, match="model_type.*gpt2"):
        write_gguf(tiny_gpt2(), byte_bpe_tokenizer(), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="llama-quantize"):
        export_gguf("default", None, tmp_path / "x.gguf", "q4_k_m")
    assert not list(tmp_path.iterdir())
