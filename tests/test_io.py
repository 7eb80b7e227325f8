"""save_adapter / load_adapter: bit-exact round trips, validation of bad files (model unchanged), PiSSA."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.adapters import adapter_layers
from lorakit.io import AdapterFileError

LLAMA_T = ["q_proj", "v_proj", "o_proj", "down_proj"]
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


class TinyConv(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


ROUND_TRIP = {
    "llama-plain": (tiny_llama, dict(r=4, targets=LLAMA_T)),
    "llama-dora-rslora": (tiny_llama, dict(r=4, targets=LLAMA_T, use_dora=True, use_rslora=True)),
    "llama-patterns": (tiny_llama, dict(r=4, targets=LLAMA_T, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama-embedding-tokens-saved": (
        tiny_llama, dict(r=4, targets=["embed_tokens", "q_proj"], trainable_token_indices={"embed_tokens": [4, 8]}, modules_to_save=["lm_head"]),
    ),
    "llama-tied-tokens": (lambda: tiny_llama(tie=True), dict(r=2, targets=["q_proj"], trainable_token_indices=[3, 7])),
    "gpt2-dora-bias": (tiny_gpt2, dict(r=4, targets=["c_attn", "c_fc"], use_dora=True, bias="lora_only")),
    "conv2d": (TinyConv, dict(r=2, targets=["conv", "head"])),
}  # fmt: skip


def _inputs(model):
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


def _adapter_tensors(model):
    return {
        f"{m}.{n}": p.detach()
        for m, layer in adapter_layers(model)
        for n, p in layer.named_parameters()
        if n.startswith(("lora.", "tokens.", "lora_copies."))
    }


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        sorted(lorakit.adapter_records(model)),
        lorakit.active_adapters(model),
        [n for n, p in model.named_parameters() if p.requires_grad],
    )


def _assert_unchanged(model, snap):
    state, types, names, active, trainable = _snapshot(model)
    assert types == snap[1] and names == snap[2] and active == snap[3] and trainable == snap[4]
    assert state.keys() == snap[0].keys()
    for k, v in state.items():
        assert torch.equal(v, snap[0][k]), k


@pytest.mark.parametrize("case", ROUND_TRIP)
def test_save_load_bit_exact(case, tmp_path):
    make, kwargs = ROUND_TRIP[case]
    model = make()
    lorakit.add_adapter(model, lorakit.LoraConfig(**kwargs))
    randomize_adapters(model)
    if kwargs.get("bias", "none") != "none":
        with torch.no_grad():
            model.transformer.h[0].attn.c_attn.bias.add_(0.5)
    x = _inputs(model)
    expected = _out(model, x)
    lorakit.save_adapter(model, tmp_path)

    fresh = make()
    adapter = lorakit.load_adapter(fresh, tmp_path)
    assert lorakit.active_adapters(fresh) == ["default"]
    assert sorted(adapter.modules) == sorted(lorakit.get_adapter(model, "default").modules)
    mine, theirs = _adapter_tensors(model), _adapter_tensors(fresh)
    assert mine.keys() == theirs.keys() and mine
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert torch.equal(_out(fresh, x), expected)
    # Saving the loaded adapter writes the same tensors again.
    lorakit.save_adapter(fresh, tmp_path / "again")
    a, b = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(tmp_path / "again/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_names_subfolders_and_activation(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, targets=["v_proj"]), name="other")
    randomize_adapters(model)
    assert lorakit.save_adapter(model, tmp_path) == tmp_path
    assert lorakit.save_adapter(model, tmp_path, name="other") == tmp_path / "other"

    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)  # no adapter active: the loaded one becomes active
    other = lorakit.load_adapter(fresh, tmp_path, name="other")  # one is active already: stays inactive
    assert other.lora_modules == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert lorakit.active_adapters(fresh) == ["default"]
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".other." in n)
    # One adapter directory can be loaded under any name.
    lorakit.load_adapter(fresh, tmp_path / "other", name="third", activate=True)
    assert lorakit.active_adapters(fresh) == ["third"]
    with pytest.raises(ValueError, match="already exists"):
        lorakit.load_adapter(fresh, tmp_path)


def test_metadata_and_dtype(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert meta["format"] == "pt" and meta["lorakit.version"] == lorakit.__version__
    assert meta["lorakit.fingerprint"] == lorakit.get_adapter(model, "default").fingerprint
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj"] and config["r"] == 2

    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    layer = fresh.model.layers[0].self_attn.q_proj
    src = model.model.layers[0].self_attn.q_proj.lora["default"]
    assert layer.lora["default"].A.dtype == torch.float32  # the adapter dtype rule, values exact
    assert torch.equal(layer.lora["default"].A, src.A.to(torch.bfloat16).float())


def test_unknown_config_keys_warn(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["a_future_option"] = {"x": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="a_future_option"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


# -- bad input: a clear error naming the file / module, and the model unchanged -------------------------------


@pytest.fixture
def saved(tmp_path):
    """A saved rank-4 adapter on q_proj / v_proj of tiny Llama, and a model that already has another adapter."""
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    target = tiny_llama()
    lorakit.add_adapter(target, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="existing")
    return tmp_path / "a", target


def _edit_tensors(path: Path, change) -> None:
    file = path / "adapter_model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, str(file), metadata=meta)


def _edit_config(path: Path, change) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    change(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _truncate(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


BAD = {
    "truncated": (_truncate, r"adapter_model\.safetensors: unreadable"),
    "corrupt-json": (lambda p: (p / "adapter_config.json").write_text('{"r": 4,'), r"adapter_config\.json: not valid JSON"),
    "wrong-shape": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(31, 4)})),
        r"model\.layers\.0\.self_attn\.q_proj.*shape \(31, 4\), expected \(32, 4\)",
    ),
    "rank-vs-config": (
        lambda p: _edit_config(p, lambda c: c.update(rank_pattern={"v_proj": 3})),
        r"v_proj.*shape \(4, 32\), expected \(3, 32\)",
    ),
    "unexpected-key": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{Q0}.lora_C.weight": torch.zeros(4, 32)})),
        r"unexpected key .*q_proj\.lora_C\.weight",
    ),
    "missing-key": (
        lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q0}.lora_B.weight")),
        r"missing key .*layers\.0\.self_attn\.q_proj\.lora_B\.weight",
    ),
    "missing-module-tensors": (
        lambda p: _edit_tensors(p, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v_proj" in k]),
        r"no LoRA tensors for 1 modules .*\(e\.g\. model\.layers\.1\.self_attn\.v_proj\)",
    ),
    "no-such-module": (
        lambda p: _edit_tensors(p, lambda t: t.update({k.replace("layers.1.", "layers.7."): t.pop(k) for k in list(t) if "layers.1." in k})),
        r"made for a different base model \(2 of its modules are missing from this model, e\.g\. "
        r"model\.layers\.7\.self_attn\.q_proj, model\.layers\.7\.self_attn\.v_proj\)",
    ),
    "integer-dtype": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 32, dtype=torch.int32)})),
        r"q_proj\.lora_A\.weight.*torch\.int32",
    ),
    "not-lora": (lambda p: _edit_config(p, lambda c: c.update(peft_type="IA3")), r"adapter_config\.json: peft_type"),
    "bad-config-type": (lambda p: _edit_config(p, lambda c: c.update(rank_pattern=["v_proj"])), r"adapter_config\.json: LoraConfig\.rank_pattern=\['v_proj'\] is invalid: expected a mapping"),
    "targets-nothing": (lambda p: _edit_config(p, lambda c: c.update(target_modules=["nope_proj"])), r"adapter_config\.json: targets"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_files_refused_model_unchanged(case, saved):
    path, model = saved
    damage, message = BAD[case]
    damage(path)
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=message) as err:
        lorakit.load_adapter(model, path, name="new")
    assert str(path) in str(err.value)
    _assert_unchanged(model, before)


def test_wrong_base_refused_unless_overridden(tmp_path):
    model = tiny_llama(seed=0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    other = tiny_llama(seed=1)  # same architecture, other weights
    before = _snapshot(other)
    with pytest.raises(AdapterFileError, match="different base model.*ignore_fingerprint") as err:
        lorakit.load_adapter(other, tmp_path)
    assert str(tmp_path / "adapter_model.safetensors") in str(err.value)
    _assert_unchanged(other, before)
    lorakit.load_adapter(other, tmp_path, ignore_fingerprint=True)
    assert lorakit.active_adapters(other) == ["default"]
    # The same base in bf16 has the same fingerprint.
    lorakit.load_adapter(tiny_llama(seed=0).to(torch.bfloat16), tmp_path)


def test_pickle_file_refused_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin: pickle files are never loaded"):
        lorakit.load_adapter(model, d)
    assert not marker.exists()
    _assert_unchanged(model, before)


def test_failure_while_injecting_rolls_back(tmp_path, monkeypatch):
    model = tiny_gpt2()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["c_attn"], bias="lora_only"))
    randomize_adapters(model)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias.add_(1.0)
    lorakit.save_adapter(model, tmp_path)
    target = tiny_gpt2()
    lorakit.add_adapter(target, lorakit.LoraConfig(r=2, targets=["c_proj"]), name="existing")
    before = _snapshot(target)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    import lorakit.io.load as load_mod

    monkeypatch.setattr(load_mod, "get_adapter", boom)  # after tensors and biases were copied in
    with pytest.raises(RuntimeError, match="disk on fire"):
        lorakit.load_adapter(target, tmp_path, name="new")
    _assert_unchanged(target, before)


def test_interrupted_save_keeps_previous_files(tmp_path, monkeypatch):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    old = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}
    randomize_adapters(model)

    def boom(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr("lorakit.io.files.save_file", boom)
    with pytest.raises(OSError, match="no space"):
        lorakit.save_adapter(model, tmp_path / "a")
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left behind


# -- PiSSA -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=4, targets=LLAMA_T), dict(r=4, alpha=3, targets=LLAMA_T, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 5})],
    ids=["plain", "rslora-patterns"],
)  # fmt: skip
def test_pissa_saved_as_lora_on_untouched_base(kwargs, tmp_path, ids):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    base = _out(model, ids)
    lorakit.add_adapter(model, lorakit.LoraConfig(init="pissa", **kwargs))
    torch.testing.assert_close(_out(model, ids), base, atol=1e-5, rtol=0)  # PiSSA keeps the output at init
    randomize_adapters(model, std=0.05)  # stands in for training
    trained = _out(model, ids)
    assert (trained - base).abs().max() > 1e-3
    lorakit.save_adapter(model, tmp_path)

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["rank_pattern"] == {k: 2 * v for k, v in kwargs.get("rank_pattern", {}).items()}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors[f"{Q0}.lora_A.weight"].shape == (8, 32)

    fresh = tiny_llama()  # untouched base; the fingerprint is the untouched base's too
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_out(fresh, ids), trained, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(_out(theirs, ids), trained, atol=1e-5, rtol=0)


def test_inactive_adapters_stay_frozen():
    """Only active adapters train, whether an inactive one was added or loaded."""
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["v_proj"]), name="b", activate=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.default." in n for n in trainable)
