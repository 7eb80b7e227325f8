"""combine --method ties | dare_linear | dare_ties | magnitude_prune: against PEFT's add_weighted_adapter
(its *_svd combination types) on the same adapters, and the methods' identities."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.tools import combine
from lorakit.tools.task_arithmetic import elect_and_merge, magnitude_mask, merge_deltas
from test_tools_math import loaded, make, tiny_llama

CFG_A = lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
CFG_B = lorakit.LoraConfig(r=6, alpha=3, targets=["q_proj", "v_proj"])


def peft_merged(tmp_path, weights, combination_type, rank, density, sign, seed):
    """ΔW per module of PEFT's add_weighted_adapter over adapters a and b."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    torch.manual_seed(seed)
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination_type, svd_rank=rank,
                            density=density, majority_sign_method=sign)  # fmt: skip
    out = {}
    for n, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            A, B = mod.lora_A["m"].weight.double(), mod.lora_B["m"].weight.double()
            out[n] = B @ A * mod.scaling["m"]
    return out


@pytest.mark.parametrize(
    "method, sign, seed",
    [("ties", "total", 0), ("ties", "frequency", 0), ("magnitude_prune", "total", 0),
     ("dare_linear", "total", 3), ("dare_ties", "total", 4), ("dare_ties", "frequency", 5)],
)  # fmt: skip
def test_matches_peft_add_weighted_adapter(tmp_path, monkeypatch, method, sign, seed):
    # DARE: both implementations draw one torch.bernoulli mask per (module, adapter), in the same order here
    # (q_proj, v_proj of layer 0, then layer 1); PEFT also draws the new adapter's init from torch's RNG
    # first, so the masks are made equal by giving the k-th bernoulli call of each run the k-th fixed draw.
    real, calls = torch.bernoulli, []

    def bernoulli(p, *args, **kw):
        calls.append(1)
        return real(p, generator=torch.Generator().manual_seed(1000 * seed + len(calls)))

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    make(tmp_path, "a", CFG_A, seed=1)
    make(tmp_path, "b", CFG_B, seed=2)
    weights, rank, density = [0.8, -0.6], 5, 0.4
    rep = combine([tmp_path / "a", tmp_path / "b"], tmp_path / "out", weights=weights, method=method,
                  rank=rank, density=density, majority_sign=sign, seed=seed)  # fmt: skip
    got = loaded(tmp_path / "out")
    n_calls, calls[:] = len(calls), []
    want = peft_merged(tmp_path, weights, f"{method}_svd", rank, density, sign, seed)
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-5, rtol=0, msg=n)
    assert {m.rank for m in rep.modules} == {rank}
    assert n_calls == len(calls) == (8 if method.startswith("dare") else 0)  # 4 modules x 2 adapters
    # Not trivially equal: the method changed something against the plain weighted sum.
    plain = {n: sum(w * d[n] for w, d in zip(weights, (loaded(tmp_path / "a"), loaded(tmp_path / "b"))))
             for n in got}  # fmt: skip
    assert max((got[n] - plain[n]).abs().max() for n in got) > 1e-3


def test_identities():
    g = torch.Generator().manual_seed(0)
    d = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.5, -1.0, 2.0]
    linear = sum(wi * di for wi, di in zip(w, d))
    # Density 1 keeps everything: magnitude pruning and DARE are the weighted sum.
    for method in ("magnitude_prune", "dare_linear"):
        torch.testing.assert_close(merge_deltas(d, w, method, 1.0), linear)
    # Magnitude mask: exactly ⌊d·numel⌋ entries, each at least as large as every dropped one.
    m = magnitude_mask(d[0], 0.3)
    assert int(m.sum()) == 9 and d[0].abs()[m].min() >= d[0].abs()[~m].max()
    # TIES on one tensor: the (weighted) tensor itself, wherever it is non-zero.
    torch.testing.assert_close(elect_and_merge([d[0]], [2.0]), 2.0 * d[0])
    # Opposite signs of equal size: the elected sign is + (a tied vote counts as +), the - entries drop out.
    x = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    assert elect_and_merge([x, -x], [1.0, 1.0]).tolist() == [[1.0, 3.0]]
    # Agreeing entries average (disjoint mean), a disagreeing one is dropped: (2 + 4) / 2 for column 0.
    y = [torch.tensor([[2.0, 1.0]]), torch.tensor([[4.0, 1.0]]), torch.tensor([[-1.0, 0.0]])]
    assert elect_and_merge(y, [1.0, 1.0, 1.0]).tolist() == [[3.0, 1.0]]


def test_dare_is_unbiased_and_seeded():
    g = torch.Generator().manual_seed(1)
    d = [torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    w = [1.0, 0.5]
    torch.manual_seed(0)
    draws = torch.stack([merge_deltas(d, w, "dare_linear", 0.5) for _ in range(3000)])
    mean, sem = draws.mean(0), draws.std(0) / 3000**0.5
    assert ((mean - (d[0] + 0.5 * d[1])).abs() < 5 * sem + 1e-9).all()
    torch.manual_seed(7)
    one = merge_deltas(d, w, "dare_linear", 0.5)
    torch.manual_seed(7)
    assert torch.equal(one, merge_deltas(d, w, "dare_linear", 0.5))


def test_bad_arguments(tmp_path):
    make(tmp_path, "a", CFG_A, seed=1)
    with pytest.raises(ValueError, match="--density 0.0 is invalid"):
        combine([tmp_path / "a"], tmp_path / "o", method="ties", density=0.0)
    with pytest.raises(ValueError, match="--majority-sign 'most' is invalid"):
        combine([tmp_path / "a"], tmp_path / "o", method="ties", majority_sign="most")
    assert not (tmp_path / "o").exists()
