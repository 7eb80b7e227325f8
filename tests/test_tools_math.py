"""Adapter tools on files: the ΔW identities of combine / resize / convert, checked against plain torch
(dense sums and torch.linalg.svd) and against PEFT loading the outputs."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.io.files import WEIGHTS_NAME
from lorakit.tools import combine, convert, resize

ATOL = 1e-5


def make(tmp_path, name, cfg, seed=1, model_fn=tiny_llama):
    """Save a randomized adapter of `cfg` on the seed-0 tiny model; return its dense ΔW per module."""
    model = model_fn()
    lorakit.add_adapter(model, cfg)
    randomize_adapters(model, std=0.3, seed=seed)
    lorakit.save_adapter(model, tmp_path / name)
    return deltas(model)


def deltas(model) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A per module (B·A as (out, in), whatever the layer stores), float64, from lorakit layers."""
    out = {}
    for n, layer in lorakit.adapters.lora_layers(model):
        w = layer.lora["default"]
        out[n] = (w.B.detach().double().flatten(1) @ w.A.detach().double().flatten(1)) * w.scale
    return out


def loaded(path, model_fn=tiny_llama) -> dict[str, torch.Tensor]:
    model = model_fn()
    lorakit.load_adapter(model, path)
    return deltas(model)


def peft_deltas(path, model_fn=tiny_llama) -> dict[str, torch.Tensor]:
    """ΔW as PEFT computes it after PeftModel.from_pretrained (its own rank/alpha pattern handling)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model_fn(), str(path))
    out = {}
    for n, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            out[n] = (B.double().flatten(1) @ A.double().flatten(1)) * mod.scaling["default"]
        elif hasattr(mod, "lora_embedding_A") and "default" in mod.lora_embedding_A:
            A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
            out[n] = (B.double() @ A.double()) * mod.scaling["default"]
    return out


def assert_close(got: dict, want: dict, atol=ATOL):
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def best_rank_k(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


CFG_A = lorakit.LoraConfig(
    r=4,
    alpha=8,
    targets=["q_proj", "v_proj", "up_proj"],
    rank_pattern={"v_proj": 2},
    alpha_pattern={"q_proj": 3},
)
CFG_B = lorakit.LoraConfig(r=6, alpha=5, use_rslora=True, targets=["q_proj", "v_proj", "up_proj"])
CFG_C = lorakit.LoraConfig(r=3, alpha=-2, targets=["q_proj", "k_proj"])  # another module set, negative alpha


def test_cat_is_exact_weighted_sum(tmp_path):
    """Mixed ranks, rank_pattern / alpha_pattern, rsLoRA, negative weights, a module missing from one input."""
    da = make(tmp_path, "a", CFG_A, seed=1)
    db = make(tmp_path, "b", CFG_B, seed=2)
    dc = make(tmp_path, "c", CFG_C, seed=3)
    w = [0.7, -1.3, 2.0]
    rep = combine([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "out", weights=w, method="cat")
    want = {}
    for d, wi in zip((da, db, dc), w):
        for n, t in d.items():
            want[n] = want.get(n, 0) + wi * t
    assert_close(loaded(tmp_path / "out"), want)
    assert_close(peft_deltas(tmp_path / "out"), want)
    ranks = {m.name: m.rank for m in rep.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 6 + 3
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 + 6
    assert ranks["model.layers.0.self_attn.k_proj"] == 3
    assert max(m.rel_error for m in rep.modules) < 1e-6
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"]
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["rank_pattern"]
    assert cfg["target_modules"] == sorted(want)  # module sets differ: listed by name


def test_negative_weight_cancels_exactly(tmp_path):
    """w·A + (-w)·A = 0: PEFT's sqrt-of-weight path cannot do this (#3004)."""
    make(tmp_path, "a", CFG_B, seed=2)
    combine([tmp_path / "a", tmp_path / "a"], tmp_path / "out", weights=[0.5, -0.5])
    for t in loaded(tmp_path / "out").values():
        assert t.abs().max() < 1e-6


def test_svd_is_best_rank_k_of_the_sum(tmp_path):
    da = make(tmp_path, "a", CFG_A, seed=1)
    db = make(tmp_path, "b", CFG_B, seed=2)
    rep = combine(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "out", weights=[1.5, -0.5], method="svd", rank=3
    )
    want = {n: best_rank_k(1.5 * da[n] - 0.5 * db[n], 3) for n in da}
    assert_close(loaded(tmp_path / "out"), want)
    assert_close(peft_deltas(tmp_path / "out"), want)
    for m in rep.modules:
        S = torch.linalg.svdvals(1.5 * da[m.name] - 0.5 * db[m.name])
        assert m.rank == 3
        assert m.rel_error == pytest.approx(float((S[3:] ** 2).sum().sqrt() / S.norm()), rel=1e-4)


def test_linear_is_approximate_and_reports_its_error(tmp_path):
    cfg = lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    da = make(tmp_path, "a", cfg, seed=1)
    db = make(tmp_path, "b", cfg.replace(alpha=3.0), seed=2)
    rep = combine([tmp_path / "a", tmp_path / "b"], tmp_path / "out", weights=[0.6, -0.4], method="linear")
    got = loaded(tmp_path / "out")
    for m in rep.modules:
        exact = 0.6 * da[m.name] - 0.4 * db[m.name]
        err = float((got[m.name] - exact).norm() / exact.norm())
        assert m.rank == 4 and m.rel_error == pytest.approx(err, rel=1e-4) and err > 1e-3
    # One input with weight w: linear is exact (no cross terms), with the weight applied once.
    combine([tmp_path / "a"], tmp_path / "one", weights=[-2.0], method="linear")
    assert_close(loaded(tmp_path / "one"), {n: -2.0 * t for n, t in da.items()})
    make(tmp_path, "r6", CFG_B)
    with pytest.raises(ValueError, match="equal ranks"):
        combine([tmp_path / "a", tmp_path / "r6"], tmp_path / "x", method="linear")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("k", [1, 3])
def test_resize_is_truncated_svd_and_error_is_tail_energy(tmp_path, k):
    da = make(tmp_path, "a", CFG_B, seed=4)
    rep = resize(tmp_path / "a", tmp_path / "out", rank=k)
    want = {n: best_rank_k(t, k) for n, t in da.items()}
    assert_close(loaded(tmp_path / "out"), want)
    assert_close(peft_deltas(tmp_path / "out"), want)
    for m in rep.modules:
        S = torch.linalg.svdvals(da[m.name])
        tail = float((S[k:] ** 2).sum().sqrt() / S.norm())
        assert m.rank_after == k
        assert m.rel_error == pytest.approx(tail, rel=1e-6)
        measured = float((want[m.name] - da[m.name]).norm() / da[m.name].norm())
        assert m.rel_error == pytest.approx(measured, rel=1e-4)
    meta = lorakit.io.read_adapter(tmp_path / "out").metadata
    assert (
        meta["lorakit.fingerprint"] == lorakit.io.read_adapter(tmp_path / "a").metadata["lorakit.fingerprint"]
    )


def test_resize_by_energy_writes_rank_pattern(tmp_path):
    da = make(tmp_path, "a", CFG_A, seed=5)
    rep = resize(tmp_path / "a", tmp_path / "out", energy=0.8)
    for m in rep.modules:
        S2 = torch.linalg.svdvals(da[m.name]) ** 2
        kept = S2.cumsum(0) / S2.sum()
        assert kept[m.rank_after - 1] >= 0.8 and (m.rank_after == 1 or kept[m.rank_after - 2] < 0.8)
    got = peft_deltas(tmp_path / "out")
    assert_close(got, {m.name: best_rank_k(da[m.name], m.rank_after) for m in rep.modules})


def test_gpt2_conv1d_and_embedding(tmp_path):
    """fan_in_fan_out (GPT-2 Conv1D) and an Embedding LoRA (lora_embedding_A/B) survive resize and combine,
    in PEFT too."""
    cfg = lorakit.LoraConfig(r=5, alpha=10, targets=["c_attn", "wte"])
    da = make(tmp_path, "a", cfg, seed=6, model_fn=tiny_gpt2)
    resize(tmp_path / "a", tmp_path / "out", rank=2)
    want = {n: best_rank_k(t, 2) for n, t in da.items()}
    assert_close(loaded(tmp_path / "out", tiny_gpt2), want)
    assert_close(peft_deltas(tmp_path / "out", tiny_gpt2), want)
    db = make(tmp_path, "b", cfg.replace(r=3, alpha=2.0, use_rslora=True), seed=7, model_fn=tiny_gpt2)
    combine([tmp_path / "a", tmp_path / "b"], tmp_path / "cat", weights=[-0.5, 1.5])
    assert_close(peft_deltas(tmp_path / "cat", tiny_gpt2), {n: -0.5 * da[n] + 1.5 * db[n] for n in da})


def test_outputs_give_peft_logits_equal_to_lorakit(tmp_path, ids):
    from peft import PeftModel

    make(tmp_path, "a", CFG_A, seed=1)
    make(tmp_path, "b", CFG_B, seed=2)
    combine([tmp_path / "a", tmp_path / "b"], tmp_path / "cat", weights=[1.0, -0.7])
    resize(tmp_path / "a", tmp_path / "small", energy=0.7)
    for out in ("cat", "small"):
        ours = tiny_llama()
        lorakit.load_adapter(ours, tmp_path / out)
        theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / out))
        with torch.no_grad():
            a, b, base = ours(ids).logits, theirs(ids).logits, tiny_llama()(ids).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (a - base).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize(
    "dtype,torch_dtype,eps", [("bf16", torch.bfloat16, 2**-8), ("fp16", torch.float16, 2**-11)]
)
def test_convert_halves_file_within_rounding(tmp_path, dtype, torch_dtype, eps):
    cfg = lorakit.LoraConfig(r=16, alpha=32, targets="all-linear")
    make(tmp_path, "a", cfg, seed=7)
    rep = convert(tmp_path / "a", tmp_path / "out", dtype)
    src = lorakit.io.read_adapter(tmp_path / "a")
    dst = lorakit.io.read_adapter(tmp_path / "out")
    assert sorted(src.tensors) == sorted(dst.tensors) and src.config == dst.config
    assert dst.metadata["lorakit.fingerprint"] == src.metadata["lorakit.fingerprint"]
    for k, t in src.tensors.items():
        assert dst.tensors[k].dtype == torch_dtype
        # Round to nearest: half an ulp, relative, or half the subnormal spacing near zero.
        bound = eps * t.abs() + eps * torch.finfo(torch_dtype).smallest_normal
        assert ((dst.tensors[k].float() - t).abs() <= bound).all(), k
    assert dst.num_bytes * 2 == src.num_bytes
    size = lambda d: (d / WEIGHTS_NAME).stat().st_size  # noqa: E731
    assert size(tmp_path / "out") < 0.54 * size(tmp_path / "a")  # + the JSON header
    assert rep.bytes_after < 0.55 * rep.bytes_before and 0 < rep.max_rel_error <= eps


def test_convert_refuses_fp16_overflow(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora["default"].B.fill_(1e6)
    lorakit.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="outside the range of fp16; use --dtype bf16"):
        convert(tmp_path / "a", tmp_path / "out", "fp16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", [0.5, -3.0])
def test_functional_factor_svd_against_dense(scale):
    from lorakit import functional as LF

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=g), torch.randn(24, 6, generator=g)
    dense = LF.delta_weight(A.double(), B.double(), scale)
    U, S, Vh = LF.delta_svd(A, B, scale)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:6])  # rank 6: the rest are 0
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense)
    torch.testing.assert_close(LF.delta_singular_values(A, B, scale), S)
    assert LF.delta_norm(A, B, scale) == pytest.approx(float(dense.norm()), rel=1e-9)
    A2, B2 = LF.svd_factors(U, S, Vh, 2, scale)
    torch.testing.assert_close(LF.delta_weight(A2, B2, scale), best_rank_k(dense, 2))
    Ac, Bc = LF.concat_factors([(A.double(), B.double(), scale), (A2, B2, -2.0 * scale)])
    torch.testing.assert_close(Bc @ Ac, dense - 2.0 * best_rank_k(dense, 2))


def test_peft_written_inputs(tmp_path):
    """Adapters saved by PEFT itself (rsLoRA, rank / alpha patterns, task_type) are read as PEFT means them."""
    import peft

    pm = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM",
                        rank_pattern={"o_proj": 3}, alpha_pattern={"layers.1.self_attn.q_proj": 5}),
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "p"))
    want = peft_deltas(tmp_path / "p")
    db = make(tmp_path, "b", CFG_B, seed=2)
    combine([tmp_path / "p", tmp_path / "b"], tmp_path / "out", weights=[-1.0, 0.25])
    total = {n: -want.get(n, 0) + 0.25 * db.get(n, 0) for n in {*want, *db}}
    assert_close(peft_deltas(tmp_path / "out"), total)
    resize(tmp_path / "p", tmp_path / "r", rank=2)
    assert_close(loaded(tmp_path / "r"), {n: best_rank_k(t, 2) for n, t in want.items()})
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] and cfg["use_rslora"] is False
