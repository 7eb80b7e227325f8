"""Non-finite numbers are refused: NaN / inf in an adapter file's tensors, in any config number, and in a
merged weight; and config fields of the wrong type (booleans are not integers) get a message naming them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit import AdapterFileError, LoraConfig
from lorakit.cli import main
from lorakit.train import TrainConfig

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _edit_tensors(path, change):
    file = path / "adapter_model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, str(file), metadata=meta)


def _poison(key, value, index=(0, 0)):
    def change(tensors):
        t = tensors[key].clone()
        t[index] = value
        tensors[key] = t

    return change


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(
        model, LoraConfig(r=2, targets=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"])
    )
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


TENSOR_CASES = {
    "nan-in-A": (f"{Q0}.lora_A.weight", math.nan),
    "inf-in-B": (f"{Q0}.lora_B.weight", math.inf),
    "-inf-in-magnitude": (f"{Q0}.lora_magnitude_vector", -math.inf),
    "nan-in-saved-module": ("base_model.model.lm_head.weight", math.nan),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_non_finite_tensor_refused_naming_file_key_and_count(case, saved):
    key, value = TENSOR_CASES[case]
    index = (0,) if "magnitude" in key else (0, 0)
    _edit_tensors(saved, _poison(key, value, index))
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(AdapterFileError) as err:
        lorakit.load_adapter(model, saved)
    msg = str(err.value)
    assert str(saved / "adapter_model.safetensors") in msg and repr(key) in msg and "has 1 of" in msg
    assert "non-finite" in msg
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_merge_cli_refuses_a_nan_adapter_and_writes_nothing(saved, tmp_path, capsys):
    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    _edit_tensors(saved, _poison(f"{Q0}.lora_B.weight", math.nan))
    out = tmp_path / "merged"
    rc = main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(saved), "--output", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "lora_B" in err and "Traceback" not in err
    assert not out.exists()


def test_merge_never_writes_a_non_finite_weight(tmp_path, capsys):
    # Finite factors whose product overflows float16: merging would put inf into W.
    model = tiny_llama().half()
    lorakit.add_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.fill_(300.0)
    before = _snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"merging adapter 'default' into 'model\.layers\.0\.self_attn\.q_proj' gives \d+ non-finite",
    ):
        lorakit.merge(model)
    assert not lorakit.is_merged(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # W restored bit for bit

    # The same through `lorakit merge --dtype float16`: exit 1, one line, nothing written.
    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = tiny_llama().half()  # the base as the merge loads it (the fingerprint is of these weights)
    lorakit.add_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.fill_(300.0)
    lorakit.save_adapter(model, tmp_path / "big")
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "big"), "--output", str(out),
            "--dtype", "float16"]  # fmt: skip
    assert main(argv) == 1
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()


CONFIG_CASES = {
    "alpha_pattern-inf": ({"alpha_pattern": {"q_proj": math.inf}}, r"alpha_pattern\['q_proj'\]=inf is invalid: expected a finite"),
    "alpha_pattern-nan": ({"alpha_pattern": {"q_proj": math.nan}}, r"alpha_pattern\['q_proj'\]=nan is invalid: expected a finite"),
    "alpha_pattern-bool": ({"alpha_pattern": {"q_proj": True}}, r"alpha_pattern\['q_proj'\]=True is invalid"),
    "lora_alpha-inf": ({"lora_alpha": math.inf}, r"alpha=inf is invalid: expected a finite"),
    "lora_alpha-bool": ({"lora_alpha": True}, r"alpha=True is invalid: expected a finite"),
    "rank_pattern-bool": ({"rank_pattern": {"q_proj": True}}, r"rank_pattern\['q_proj'\]=True is invalid: expected a positive integer"),
    "rank_pattern-float": ({"rank_pattern": {"q_proj": 2.0}}, r"rank_pattern\['q_proj'\]=2\.0 is invalid: expected a positive integer"),
    "r-bool": ({"r": True}, r"LoraConfig\.r=True is invalid: expected a positive integer"),
    "r-float": ({"r": 2.0}, r"LoraConfig\.r=2\.0 is invalid: expected a positive integer"),
    "dropout-nan": ({"lora_dropout": math.nan}, r"dropout=nan is invalid"),
    "dropout-string": ({"lora_dropout": "0.1"}, r"dropout='0\.1' is invalid"),
    "layers_to_transform-string": ({"layers_to_transform": "0,1"}, r"layers_to_transform='0,1' is invalid: expected a list of layer indices"),
    "layers_to_transform-bool": ({"layers_to_transform": [True]}, r"layers_to_transform=\[True\] is invalid"),
    "use_dora-string": ({"use_dora": "false"}, r"use_dora='false' is invalid: expected true or false"),
    "target_modules-number": ({"target_modules": [1]}, r"targets=\[1\] is invalid"),
    "trainable_token_indices-bool": ({"trainable_token_indices": [True]}, r"trainable_token_indices=\[True\] is invalid"),
    "modules_to_save-string-list": ({"modules_to_save": [None]}, r"modules_to_save=\[None\] is invalid"),
}  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_number_or_type_refused_naming_the_field(case, tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    change, message = CONFIG_CASES[case]
    cfg.update(change)
    file.write_text(json.dumps(cfg))  # NaN / Infinity are what Python's json (and PEFT's) write for them
    target = tiny_llama()
    before = _snapshot(target)
    with pytest.raises(AdapterFileError, match=message) as err:
        lorakit.load_adapter(target, tmp_path)
    assert str(file) in str(err.value)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_config_in_python_refuses_the_same():
    for kwargs in (dict(alpha=math.inf), dict(alpha_pattern={"q": math.nan}), dict(rank_pattern={"q": True}),
                   dict(layers_to_transform="0"), dict(dropout="0.1"), dict(use_rslora=1), dict(r=True)):  # fmt: skip
        with pytest.raises(ValueError, match="is invalid: expected"):
            LoraConfig(**kwargs)
    # Lists given as tuples / sets (PEFT's config objects hold sets) are fine.
    cfg = LoraConfig(exclude={"b", "a"}, modules_to_save=("lm_head",), layers_to_transform=(0, 1))
    assert (
        cfg.exclude == ["a", "b"] and cfg.modules_to_save == ["lm_head"] and cfg.layers_to_transform == [0, 1]
    )


TRAIN_CASES = {
    "lr-inf": (dict(lr=math.inf), r"--lr=inf is invalid: expected a finite number"),
    "lr-yaml-string": (dict(lr="1e-4"), r"--lr='1e-4' is invalid: expected a number \(YAML reads 1e-4 as a string"),
    "epochs-inf": (dict(epochs=math.inf), r"--epochs=inf is invalid"),
    "weight_decay-nan": (dict(weight_decay=math.nan), r"--weight-decay=nan is invalid"),
    "max_grad_norm-inf": (dict(max_grad_norm=math.inf), r"--max-grad-norm=inf is invalid"),
    "rank-bool": (dict(rank=True), r"--rank=True is invalid: expected an integer"),
    "batch_size-bool": (dict(batch_size=True), r"--batch-size=True is invalid"),
    "steps-float": (dict(steps=10.0), r"--steps=10\.0 is invalid"),
    "seed-2**64": (dict(seed=2**64), r"--seed=18446744073709551616 is invalid"),
    "resume-string": (dict(resume="no"), r"--resume='no' is invalid: expected true or false"),
    "dropout-bool": (dict(dropout=True), r"--dropout=True is invalid"),
}  # fmt: skip


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_config_numbers_and_types(case, tmp_path):
    kwargs, message = TRAIN_CASES[case]
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
    # From YAML: the same message, naming the file.
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(kwargs) if "yaml" not in case else "lr: 1e-4\n")
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig.from_yaml(path)
    assert str(path) in str(err.value)
