"""Adapter files move both ways between lorakit and PEFT 0.21 with the same logits (fp32, atol 1e-5)."""

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.inject import find_targets
from lorakit.io.validate import _saved_modules
from test_io import TinyConv, _inputs, _out

peft = pytest.importorskip("peft")


def tiny_llama_cls():
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config
    config.num_labels = 3
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


LLAMA_T = ["q_proj", "v_proj", "o_proj", "down_proj"]
GPT2_T = ["c_attn", "c_proj", "c_fc"]

# id: (model, adapter name, lorakit LoraConfig kwargs, PEFT LoraConfig kwargs) for the same adapter.
CASES = {
    "llama-plain": (tiny_llama, "default", dict(r=4, alpha=8, targets=LLAMA_T), dict(r=4, lora_alpha=8, target_modules=LLAMA_T)),
    "llama-all-linear": (tiny_llama, "default", dict(r=2, targets="all-linear"), dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "llama-rslora": (tiny_llama, "default", dict(r=4, alpha=3, targets=LLAMA_T, use_rslora=True), dict(r=4, lora_alpha=3, target_modules=LLAMA_T, use_rslora=True)),
    "llama-dora": (tiny_llama, "default", dict(r=4, targets=LLAMA_T, use_dora=True), dict(r=4, lora_alpha=8, target_modules=LLAMA_T, use_dora=True)),
    "llama-patterns": (
        tiny_llama, "default",
        dict(r=4, targets=LLAMA_T, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"o_proj": 3}),
        dict(r=4, lora_alpha=8, target_modules=LLAMA_T, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"o_proj": 3}),
    ),
    "llama-modules-to-save": (tiny_llama, "default", dict(r=4, targets=["q_proj"], modules_to_save=["lm_head"]), dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "llama-embedding": (tiny_llama, "default", dict(r=4, targets=["embed_tokens", "q_proj"]), dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-tokens": (tiny_llama, "default", dict(r=4, targets=["q_proj"], trainable_token_indices=[5, 9, 100]), dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[5, 9, 100])),
    "llama-named": (tiny_llama, "other", dict(r=4, targets=LLAMA_T), dict(r=4, lora_alpha=8, target_modules=LLAMA_T)),
    "gpt2-plain": (tiny_gpt2, "default", dict(r=4, targets=GPT2_T), dict(r=4, lora_alpha=8, target_modules=GPT2_T, fan_in_fan_out=True)),
    "gpt2-dora": (tiny_gpt2, "default", dict(r=4, targets=["c_attn"], use_dora=True), dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)),
    "gpt2-embedding-named": (tiny_gpt2, "emb", dict(r=4, targets=["wte", "c_fc"], alpha=6), dict(r=4, lora_alpha=6, target_modules=["wte", "c_fc"], fan_in_fan_out=True)),
    "llama-layers-exclude": (tiny_llama, "default", dict(r=2, targets=LLAMA_T, layers_to_transform=[1], exclude=["o_proj"]), dict(r=2, lora_alpha=4, target_modules=LLAMA_T, layers_to_transform=[1], exclude_modules=["o_proj"])),
    "llama-seq-cls": (tiny_llama_cls, "default", dict(r=2, targets=["q_proj"], modules_to_save=["score"]), dict(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="SEQ_CLS")),
    "llama-tied-tokens": (lambda: tiny_llama(tie=True), "default", dict(r=2, targets=["q_proj"], trainable_token_indices=[5, 9]), dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[5, 9])),
    "gpt2-bias-all": (tiny_gpt2, "default", dict(r=4, targets=["c_attn"], bias="all"), dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    "conv2d": (TinyConv, "default", dict(r=2, targets=["conv", "head"]), dict(r=2, lora_alpha=4, target_modules=["conv", "head"])),
    "gpt2-bias": (tiny_gpt2, "default", dict(r=4, targets=["c_attn"], bias="lora_only"), dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)),
}  # fmt: skip


def _perturb_biases(model, names, everywhere=False):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and (everywhere or any(f"{m}." in n for m in names)):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", CASES)
def test_lorakit_to_peft(case, tmp_path):
    make, name, ours, _ = CASES[case]
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(**ours), name=name)
    randomize_adapters(model)
    if ours.get("bias", "none") != "none":
        _perturb_biases(model, ours["targets"], everywhere=ours["bias"] == "all")
    x = _inputs(model)
    expected, base = _out(model, x), _out(make(), x)
    assert (expected - base).abs().max() > 1e-3  # the adapter does something

    out = lorakit.save_adapter(model, tmp_path, name=name)
    assert out == (tmp_path if name == "default" else tmp_path / name)
    theirs = peft.PeftModel.from_pretrained(make(), str(out), adapter_name=name).eval()
    got = _out(theirs, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_peft_to_lorakit(case, tmp_path):
    make, name, _, theirs_kwargs = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**theirs_kwargs), adapter_name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n or "modules_to_save" in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif n.endswith("bias") and theirs_kwargs.get("bias", "none") != "none":
                if theirs_kwargs["bias"] == "all" or n.endswith("base_layer.bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    x = _inputs(theirs)
    expected = _out(theirs, x)
    assert (expected - _out(make(), x)).abs().max() > 1e-3
    theirs.save_pretrained(str(tmp_path))

    model = make()
    adapter = lorakit.load_adapter(model, tmp_path, name=name)
    assert adapter.name == name and lorakit.active_adapters(model) == [name]
    got = _out(model, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_same_keys_shapes_and_config_as_peft(case, tmp_path):
    """The file lorakit writes has exactly PEFT's tensor keys and shapes, and a config PEFT reads back as ours.

    PEFT also stores an adapted embedding's whole base weight (save_embedding_layers); lorakit does not
    (the base is unchanged, and it can be large: PEFT #2898).
    """
    from safetensors import safe_open

    make, name, ours, theirs_kwargs = CASES[case]
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(**ours), name=name)
    mine = lorakit.save_adapter(model, tmp_path / "ours", name=name)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**theirs_kwargs), adapter_name=name)
    theirs.save_pretrained(str(tmp_path / "peft"))
    peft_dir = tmp_path / "peft" if name == "default" else tmp_path / "peft" / name

    def shapes(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {
                k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("base_layer.weight")
            }

    assert shapes(mine) == shapes(peft_dir)
    a = peft.LoraConfig.from_pretrained(str(mine)).to_dict()
    b = peft.LoraConfig.from_pretrained(str(peft_dir)).to_dict()
    for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out",
              "trainable_token_indices", "bias", "peft_type"):  # fmt: skip
        assert a[k] == b[k], k
    # Targets and modules_to_save may be written differently (PEFT: "all-linear" as full names, a task's
    # usual head names) but must select the same modules.
    fresh = make()
    for cfg in (a, b):
        cfg["target_modules"] = (
            list(cfg["target_modules"]) if isinstance(cfg["target_modules"], set) else cfg["target_modules"]
        )
        cfg["modules_to_save"] = _saved_modules(fresh, list(cfg["modules_to_save"] or []))
    ours_cfg, their_cfg = (lorakit.LoraConfig.from_peft_dict(c) for c in (a, b))
    assert find_targets(fresh, ours_cfg) == find_targets(fresh, their_cfg)
    assert a["modules_to_save"] == b["modules_to_save"]


def test_peft_embedding_base_weight_must_match(tmp_path):
    """PEFT saves an adapted embedding's base weight too; lorakit accepts it only when it is the model's own."""
    from safetensors.torch import load_file, save_file

    from test_io import _assert_unchanged, _snapshot

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    theirs.save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors
    tensors[key] = tensors[key] + 1  # e.g. an embedding resized and trained for new tokens
    save_file(tensors, str(file), metadata={"format": "pt"})
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(lorakit.AdapterFileError, match=r"'model\.embed_tokens'.*base weight"):
        lorakit.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)
