"""LoRA on fused MoE expert parameters (`target_parameters`) against PEFT 0.21's `lora.ParamWrapper`, on tiny
random Mixtral (experts (E, out, in)), Qwen3-MoE and gpt-oss (experts (E, in, out), `is_transposed`) models."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from lorakit import param_lora

peft = pytest.importorskip("peft")

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, num_experts_per_tok=2)  # fmt: skip


def tiny_moe(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**SMALL, num_local_experts=4)
        return tf.MixtralForCausalLM(cfg).eval()
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**SMALL, moe_intermediate_size=12, num_experts=4, head_dim=8)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if family == "gpt_oss":
        cfg = tf.GptOssConfig(**SMALL, num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2)
        return tf.GptOssForCausalLM(cfg).eval()
    raise ValueError(family)


FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss"]


def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def randomize(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_model(family, r=2):
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=TARGETS)
    pm = peft.get_peft_model(tiny_moe(family), cfg)
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    return pm


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_fused_parameters(family):
    model = tiny_moe(family)
    fused = dict(param_lora.fused_parameters(model))
    assert (
        "model.layers.0.mlp.experts.gate_up_proj" in fused and "model.layers.1.mlp.experts.down_proj" in fused
    )
    assert all(len(s) == 3 and s[0] == 4 for s in fused.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_file_loads_and_gives_peft_outputs(family, tmp_path):
    pm = peft_model(family)
    want = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_moe(family)
    base = logits(model)
    lorakit.load_adapter(model, tmp_path / "peft")
    got = logits(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the outputs
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model), base, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_file_is_peft_s_file(family, tmp_path):
    model = tiny_moe(family)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=[], target_parameters=TARGETS))
    randomize(list(param_lora.adapter_parameters(model)))
    want = logits(model)
    lorakit.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(tiny_moe(family), tmp_path / "ours")
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=1e-5)
    # Same keys and shapes as PEFT writes for the same config.
    from safetensors.torch import load_file

    peft_model(family).save_pretrained(tmp_path / "peft")
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gradients_equal_peft_s(family, tmp_path):
    pm = peft_model(family)
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_moe(family)
    lorakit.load_adapter(model, tmp_path / "peft")
    model.train()
    pm.train()
    for m in (model, pm):
        m(input_ids=ids(), labels=ids()).loss.backward()
    # PEFT's parameter names are its file keys with the adapter name before ".weight".
    theirs = {
        n.replace(".default.weight", ".weight"): p.grad for n, p in pm.named_parameters() if p.requires_grad
    }
    full_names = param_lora.find_param_targets(model, TARGETS)
    ours = {}
    for full in full_names:
        module_name, _, pname = full.rpartition(".")
        factors = model.get_submodule(module_name).param_lora[pname]["default"]
        for kind in ("A", "B"):
            ours[param_lora.file_key(model, full, kind, full_names)] = getattr(factors, kind).grad
    assert len(ours) == len(theirs) == 8 and ours.keys() == theirs.keys()
    for key, g in ours.items():
        torch.testing.assert_close(g, theirs[key], atol=1e-5, rtol=1e-4, msg=key)
        assert g.abs().max() > 0


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_merge_unmerge_and_unload(family, tmp_path):
    pm = peft_model(family)
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_moe(family)
    W0 = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    lorakit.load_adapter(model, tmp_path / "peft")
    live = logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), live, atol=1e-5, rtol=1e-5)
    assert (model.model.layers[0].mlp.experts.gate_up_proj - W0).abs().max() > 1e-3
    lorakit.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].mlp.experts.gate_up_proj, W0, atol=1e-6, rtol=0)
    # PEFT's merge_and_unload gives the same merged weights as lorakit's unload(merge=True).
    merged = lorakit.unload(model, merge=True)
    assert not list(param_lora.layers(merged)) and "param_lora" not in str(list(merged.state_dict()))
    theirs = pm.merge_and_unload()
    for (n, a), (_, b) in zip(merged.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=n)


def test_all_linear_says_what_it_skipped_and_how_to_target_it():
    model = tiny_moe("mixtral")
    with pytest.warns(UserWarning) as record:
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2))
    msg = str(record[0].message)
    assert "all-linear adapted 8 Linear modules and skipped 4 fused expert parameters" in msg
    assert "model.layers.0.mlp.experts.gate_up_proj (4, 48, 16)" in msg
    assert "target_parameters=['mlp.experts.down_proj', 'mlp.experts.gate_up_proj']" in msg
    # Both together: nothing is left out, so nothing is said.
    model = tiny_moe("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_parameters=TARGETS))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.1.mlp.experts.param_lora.down_proj.default.A" in trained
    assert "model.layers.1.self_attn.q_proj.lora.default.A" in trained


def test_bad_target_parameters_and_dropout_are_refused():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="'mlp.experts.up' matches no parameter.*mlp.experts.gate_up_proj"):
        lorakit.add_adapter(model, lorakit.LoraConfig(targets=[], target_parameters=["mlp.experts.up"]))
    with pytest.raises(ValueError, match="dropout must be 0"):
        lorakit.add_adapter(model, lorakit.LoraConfig(targets=[], target_parameters=TARGETS, dropout=0.1))
    assert not list(param_lora.layers(model))  # nothing was left behind


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_add_delta_equals_the_functional_delta(family):
    model = tiny_moe(family)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, targets=[], target_parameters=TARGETS))
    randomize(list(param_lora.adapter_parameters(model)))
    experts = model.model.layers[0].mlp.experts
    for pname in ("gate_up_proj", "down_proj"):
        W, f = experts._parameters[pname], experts.param_lora[pname]["default"]
        ref = W + param_lora.delta(W, f, experts.is_transposed_layout)
        torch.testing.assert_close(param_lora.add_delta(W, f, experts.is_transposed_layout), ref)
        # Expert e's delta is s · B_e @ A_e with PEFT's reshapes, in the parameter's layout.
        e, r = 2, 3
        A_e, B_e = f.A[e * r : (e + 1) * r], f.B[:, e::4]
        d = f.scale * B_e @ A_e
        torch.testing.assert_close((ref - W)[e], d.t() if experts.is_transposed_layout else d)


def test_two_active_adapters_add_and_merge_together():
    model = tiny_moe("mixtral")
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=[], target_parameters=TARGETS), name=name)
        randomize([p for n, p in model.named_parameters() if f".{name}." in n], seed=seed)
    lorakit.set_adapter(model, ["a", "b"])
    both = logits(model)
    lorakit.set_adapter(model, "a")
    only_a = logits(model)
    assert (both - only_a).abs().max() > 1e-3
    lorakit.set_adapter(model, ["a", "b"])
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), both, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "a")
    lorakit.delete_adapter(model, "b")
    assert not list(param_lora.layers(model))


def test_experts_train_under_fsdp_as_in_one_process(tmp_path):
    """2 FSDP processes (experts sharded, their adapters DTensors) equal one process, same global batch."""
    from safetensors.torch import load_file

    from lorakit.train.loop import fit
    from test_distributed import torchrun
    from test_train_resume import assert_same
    from train_tiny import config, examples, model_with_adapter

    out = tmp_path / "fsdp"
    # Padded on both sides: packing lays out 4 rows (one process) and 2 + 2 rows (two) differently, and
    # AdamW's division by |g| turns that rounding into more than 5e-5 on these tiny expert gradients.
    res = torchrun(
        out,
        "--steps",
        4,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--distributed",
        "fsdp",
        "--moe",
        "--no-packing",
    )
    assert "4 rows (2 x 1 accumulation x 2 processes)" in res.stderr
    model = model_with_adapter(moe=True)
    cfg = config(tmp_path / "one", steps=4, batch_size=2, grad_accum=2, packing=False)
    fit(model, examples(), cfg, pad_id=0)
    lorakit.save_adapter(model, tmp_path / "one" / "adapter")
    two = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    # AdamW divides by |g|: expert entries with tiny gradients carry the order of the gradient sum into the
    # update (measured: 1.8e-5 on values up to 0.19, the same under DDP), hence 5e-5 here, not 1e-5.
    assert_same(two, one, atol=5e-5)
    experts_B = [t for k, t in one.items() if "experts" in k and "lora_B" in k]
    assert len(experts_B) == 4 and min(t.abs().max() for t in experts_B) > 1e-4  # the experts trained
