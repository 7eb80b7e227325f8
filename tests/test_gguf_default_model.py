"""End to end on the default model (SmolLM2-135M-Instruct): the exported GGUF loads in transformers with
lorakit's logits, carries every key the model's own llama.cpp-made GGUF carries, and its tokenizer and
Ollama template are SmolLM2's. Slow (a 135M model exported twice)."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow


def test_default_model_exports_like_llama_cpps_own_file(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.generation import format_prompt
    from lorakit.gguf import export_gguf, translate
    from lorakit.models import default_gguf_path, load_model

    try:
        original = gguf.GGUFReader(str(default_gguf_path()))
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tok = load_model("default")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, targets="all-linear", use_rslora=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    lorakit.save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([format_prompt(tok, "Write 3 March 2021 as ISO 8601.")])
    with torch.no_grad():
        expected = model(ids).logits

    report = export_gguf("default", tmp_path / "adapter", tmp_path / "m.gguf", "f16")
    written = gguf.GGUFReader(str(report.output))
    wanted = {k for k in original.fields if k.startswith(("llama.", "tokenizer.", "general.architecture"))}
    assert wanted - set(written.fields) == set()
    assert {t.name for t in written.tensors} == {t.name for t in original.tensors}
    for key in ("llama.rope.dimension_count", "llama.attention.head_count_kv", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):  # fmt: skip
        assert written.fields[key].contents() == original.fields[key].contents(), key
    assert (
        written.fields["tokenizer.ggml.tokens"].contents()
        == original.fields["tokenizer.ggml.tokens"].contents()
    )

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = back(ids).logits
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-2 and (got[0, -1].argmax() == expected[0, -1].argmax())
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert back_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    )
    tpl = translate(tok)
    assert tpl.family == "ChatML" and tpl.system.startswith("You are a helpful AI assistant named SmolLM")
