"""Adapters the PEFT ecosystem reads as-is (task_type, base_model_name_or_path; AutoPeftModel gives lorakit's
logits), `lorakit inspect`'s per-consumer verdicts, the Ollama template translation and the export CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import CHAT_TEMPLATE, randomize_adapters
from gguf_fixtures import byte_bpe_tokenizer, tiny_causal_dir
from lorakit.io.base_ref import DEFAULT_MODEL_NAME, base_reference
from lorakit.models import load_model
from lorakit.tools.adapter_file import open_adapter
from lorakit.tools.consumers import consumer_report

IDS = torch.randint(3, 264, (2, 9), generator=torch.Generator().manual_seed(3))


def _saved(tmp_path, **cfg):
    base = tiny_causal_dir(tmp_path / "base")
    model, _ = load_model(str(base))
    lorakit.add_adapter(model, lorakit.LoraConfig(**(cfg or dict(r=4, targets="all-linear"))))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter", model


def test_adapter_config_names_task_and_absolute_base(tmp_path, monkeypatch):
    base, adapter, _ = _saved(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    # A relative spec is recorded absolute; the default model by its hub id.
    monkeypatch.chdir(tmp_path)
    assert base_reference("base") == str(base.resolve())
    assert base_reference("default") == DEFAULT_MODEL_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_reference("org/some-model") == "org/some-model"


def test_non_causal_model_keeps_task_type_null(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] is None


def test_auto_peft_model_gives_lorakit_logits(tmp_path):
    pytest.importorskip("peft")
    from peft import AutoPeftModelForCausalLM

    _, adapter, model = _saved(tmp_path, r=4, alpha=12, targets="all-linear", use_rslora=True,
                               rank_pattern={"v_proj": 2})  # fmt: skip
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    with torch.no_grad():
        expected, got = model(IDS).logits, peft_model(IDS).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_inspect_reports_each_consumer(tmp_path):
    _, adapter, _ = _saved(tmp_path, r=32, targets=["q_proj", "v_proj"])
    report = consumer_report(open_adapter(adapter))
    assert report["peft"] == {"loads": True, "problems": [], "notes": []}
    assert report["vllm"]["loads"] and "--max-lora-rank 32" in report["vllm"]["notes"][0]
    assert report["llama.cpp"]["loads"]


@pytest.mark.parametrize(
    "cfg,vllm,llama_cpp",
    [
        (dict(r=2, targets=["q_proj"], use_dora=True), "DoRA", "DoRA"),
        (dict(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save", "modules_to_save"),
        (dict(r=2, targets=["q_proj"], trainable_token_indices=[5]), "trainable tokens", "trainable_token"),
        (dict(r=2, targets=["q_proj", "k_proj"], alpha_pattern={"k_proj": 8}), "different scales", None),
    ],
)
def test_inspect_says_why_an_adapter_does_not_load(tmp_path, cfg, vllm, llama_cpp):
    _, adapter, _ = _saved(tmp_path, **cfg)
    report = consumer_report(open_adapter(adapter))
    assert not report["vllm"]["loads"] and any(vllm in p for p in report["vllm"]["problems"])
    if llama_cpp is None:
        assert report["llama.cpp"]["loads"]
    else:
        assert not report["llama.cpp"]["loads"]
        assert any(llama_cpp in p for p in report["llama.cpp"]["problems"])


def test_peft_consumer_flags_old_lorakit_configs(tmp_path):
    _, adapter, _ = _saved(tmp_path)
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(task_type=None, base_model_name_or_path="default")
    cfg_file.write_text(json.dumps(cfg))
    peft = consumer_report(open_adapter(adapter))["peft"]
    assert not peft["loads"] and "Cannot infer the auto class" in peft["problems"][0]
    assert "'default'" in peft["problems"][1]


# -- Ollama -------------------------------------------------------------------------------------------------

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0"
    " == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if"
    " add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_ollama_translates_chatml_with_its_default_system_prompt():
    from lorakit.gguf.ollama import FAMILIES, PROBES, translate

    tok = byte_bpe_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    tpl = translate(tok)
    assert tpl.family == "ChatML" and tpl.stops == ["<|im_end|>"]
    assert tpl.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}" in tpl.template
    # The layout the Go template encodes reproduces the HF rendering on each probe conversation.
    chatml = FAMILIES[0]
    conv = PROBES[2]
    assert chatml.render(tpl.system, conv) == tok.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True
    )
    tok.chat_template = CHAT_TEMPLATE  # ChatML without a default system prompt
    assert translate(tok).system is None


def test_ollama_translates_llama3_and_drops_the_bos_llama_cpp_adds():
    from lorakit.gguf.ollama import translate

    tok = byte_bpe_tokenizer()
    tok.chat_template = LLAMA3_TEMPLATE
    tpl = translate(tok)
    assert tpl.family == "Llama-3" and tpl.system is None
    assert tpl.stops[:3] == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    # This tokenizer does not add BOS to plain text, so the template keeps the literal BOS it writes.
    assert tpl.template.startswith("<|im_start|>{{- if .System }}<|start_header_id|>system")


def test_ollama_refuses_a_template_it_cannot_translate():
    from lorakit.gguf.ollama import translate

    tok = byte_bpe_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    )
    with pytest.raises(ValueError, match="cannot translate.*ChatML, Llama-3"):
        translate(tok)


def test_cli_export_writes_gguf_lora_and_ollama(tmp_path, capsys):
    pytest.importorskip("gguf")
    from lorakit.cli import main
    from lorakit.gguf.commands import QUANT_NAMES
    from lorakit.gguf.writer import QUANTS

    assert QUANT_NAMES == tuple(QUANTS)
    _, adapter, _ = _saved(tmp_path)
    # No --model: the base recorded in the adapter config (an absolute path) is used.
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-lora"]) == 0
    assert (adapter / "adapter-f32.gguf").is_file()
    out = tmp_path / "ol"
    assert main(["export", "--adapter", str(adapter), "--format", "ollama", "--output", str(out)]) == 0
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./model-f16.gguf" and (out / "model-f16.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile
    assert main(["export", "--adapter", str(adapter), "--format", "ollama", "--output", str(out)]) == 1
    assert "already holds an Ollama export" in capsys.readouterr().err
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--quant", "q4_0"]) == 1
    assert Path(adapter / "adapter-f32.gguf").is_file()


def test_cli_parser_does_not_import_the_gguf_package():
    import subprocess
    import sys

    code = "import sys, lorakit.cli as c; c.build_parser(); print('gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
