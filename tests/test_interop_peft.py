"""Adapter files move both ways between lorakit and PEFT 0.21 with the same logits (fp32, atol 1e-5)."""

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

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
    "gpt2-bias": (tiny_gpt2, "default", dict(r=4, targets=["c_attn"], bias="lora_only"), dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)),
}  # fmt: skip


def _perturb_biases(model, names):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and any(f"{m}." in n for m in names):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", CASES)
def test_lorakit_to_peft(case, ids, tmp_path):
    make, name, ours, _ = CASES[case]
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(**ours), name=name)
    randomize_adapters(model)
    if ours.get("bias", "none") != "none":
        _perturb_biases(model, ours["targets"])
    with torch.no_grad():
        expected = model(ids).logits
        base = make()(ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter does something

    out = lorakit.save_adapter(model, tmp_path, name=name)
    assert out == (tmp_path if name == "default" else tmp_path / name)
    theirs = peft.PeftModel.from_pretrained(make(), str(out), adapter_name=name).eval()
    with torch.no_grad():
        got = theirs(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_peft_to_lorakit(case, ids, tmp_path):
    make, name, _, theirs_kwargs = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**theirs_kwargs), adapter_name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n or "modules_to_save" in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif theirs_kwargs.get("bias", "none") != "none" and n.endswith("base_layer.bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - make()(ids).logits).abs().max() > 1e-3
    theirs.save_pretrained(str(tmp_path))

    model = make()
    adapter = lorakit.load_adapter(model, tmp_path, name=name)
    assert adapter.name == name and lorakit.active_adapters(model) == [name]
    with torch.no_grad():
        got = model(ids).logits
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
              "modules_to_save", "trainable_token_indices", "bias", "peft_type"):  # fmt: skip
        assert a[k] == b[k], k
    # PEFT writes "all-linear" as the full module names, lorakit as the leaf names selecting the same modules.
    assert {t.split(".")[-1] for t in a["target_modules"]} == {t.split(".")[-1] for t in b["target_modules"]}
