"""Packed SFT: bins, the packed tensors, loss and gradients equal to the padded path (3 model families), the
families that cannot pack refused, and `fit` with packing equal to `fit` padded."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.data import collate
from lorakit.losses import causal_lm_loss
from lorakit.train import packing
from lorakit.train.loop import fit
from train_tiny import config, examples, model_with_adapter


def rows(n=7, seed=0):
    """Rows of 3..17 tokens; the first 2 tokens carry no loss (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 18, (1,), generator=g))
        ids = torch.randint(3, 128, (k,), generator=g).tolist()
        out.append(SimpleNamespace(input_ids=ids, labels=[-100] * 2 + ids[2:]))
    return out


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


def tiny_opt(seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=128,
    )  # fmt: skip
    return OPTForCausalLM(cfg).eval()


def adapted(build, attn="sdpa"):
    model = build()
    model.config._attn_implementation = attn
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets="all-linear"))
    randomize_adapters(model)  # B != 0, so the adapter's gradients and outputs are not trivial
    return model


def loss_and_grads(model, batch, chunk=0):
    model.zero_grad(set_to_none=True)
    s, n = causal_lm_loss(
        model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], chunk,
        position_ids=batch.get("position_ids"),
    )  # fmt: skip
    (s / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return s.detach(), n, grads


def test_pack_bins_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2, 4, 10]
    bins = packing.pack_bins(lengths, 11)
    assert sorted(i for b in bins for i in b) == list(range(7))  # every row exactly once
    assert all(sum(lengths[i] for i in b) <= 11 for b in bins)
    # FFD, longest first, each into the first bin with room: 10 | 9 | 7 | 5, then 4 -> 7's, 3 -> 5's, 2 -> 9's:
    # 40 tokens in 4 bins of 11, the fewest possible.
    assert bins == [[6], [1, 4], [3, 5], [0, 2]]  # (as indices into lengths)
    assert packing.pack_bins(lengths, 11) == bins  # deterministic
    assert packing.pack_bins([12, 3], 10) == [[0], [1]]  # too long for a bin: a bin of its own
    with pytest.raises(ValueError, match="capacity"):
        packing.pack_bins(lengths, 0)


def test_packing_computes_fewer_tokens_than_padding_on_mixed_lengths():
    lengths = [30, 3, 28, 2, 25, 5, 4, 27]  # 124 real tokens
    mbs = packing.plan(lengths, 32, per_batch=4)
    assert sorted(i for mb in mbs for b in mb for i in b) == list(range(8))
    # The budget: bins x widest bin <= 4 x 32 tokens a micro-batch.
    assert all(len(mb) * max(sum(lengths[i] for i in b) for b in mb) <= 128 for mb in mbs)
    computed = sum(len(mb) * max(sum(lengths[i] for i in b) for b in mb) for mb in mbs)
    # Counting tokens only, all 8 rows in one sequence of 124 tokens (within the budget of 4 x 32): no pad.
    assert computed == 124 and len(mbs) == 1
    assert packing.padded_tokens(lengths, 4) == 4 * 30 + 4 * 27  # padded: 2 micro-batches, 54 % real
    # When attention is dear, narrower bins: 30 | 28+2 | 27+3 | 25+5, then 4 (no pad either).
    narrow = packing.plan(lengths, 32, per_batch=4, attention=0.05)
    assert [[sum(lengths[i] for i in b) for b in mb] for mb in narrow] == [[30, 30, 30, 30], [4]]


def test_plan_never_computes_more_than_padding():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, per_batch = (
            int(torch.randint(1, 12, (1,), generator=g)),
            int(torch.randint(1, 5, (1,), generator=g)),
        )
        lengths = torch.randint(1, 40, (n,), generator=g).tolist()
        mbs = packing.plan(lengths, 48, per_batch, attention=0.0 if trial % 2 else 0.01)
        assert sorted(i for mb in mbs for b in mb for i in b) == list(range(n))
        sizes = [len(mb) * max(sum(lengths[i] for i in b) for b in mb) for mb in mbs]
        assert all(size <= per_batch * 48 for size in sizes)  # the token budget of a micro-batch
        if trial % 2:
            assert sum(lengths) <= sum(sizes) <= packing.padded_tokens(lengths, per_batch), (trial, lengths)


def test_collate_packed_positions_restart_and_no_loss_across_rows():
    a = SimpleNamespace(input_ids=[5, 6, 7], labels=[-100, 6, 7])
    b = SimpleNamespace(input_ids=[8, 9], labels=[8, 9])
    c = SimpleNamespace(input_ids=[4, 3], labels=[-100, 3])
    batch = packing.collate_packed([[a, b], [c]], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the packed format
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # b's first token is not a target of a's last one; pads carry no loss.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 3, -100, -100, -100]]


@pytest.mark.parametrize(
    "build,attn,chunk",
    [(tiny_llama, "sdpa", 0), (tiny_llama, "sdpa", 16), (tiny_llama, "eager", 0), (tiny_gpt2, "sdpa", 0),
     (tiny_gpt2, "eager", 16), (tiny_qwen2, "sdpa", 0)],
)  # fmt: skip
def test_packed_loss_and_gradients_equal_padded(build, attn, chunk):
    model = adapted(build, attn)
    assert packing.check(model) == ""
    data = rows()
    padded = collate(data, pad_id=0)
    lengths = [len(r.input_ids) for r in data]
    bins = packing.pack_bins(lengths, 24)
    assert len(bins) < len(data)  # rows really share sequences
    packed = packing.collate_packed([[data[i] for i in b] for b in bins], pad_id=0)
    s0, n0, g0 = loss_and_grads(model, padded, chunk)
    s1, n1, g1 = loss_and_grads(model, packed, chunk)
    assert n1 == n0 == sum(sum(t != -100 for t in r.labels[1:]) for r in data)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-5, msg=k)


def test_a_family_that_ignores_packed_positions_is_refused():
    model = adapted(tiny_opt)
    data = rows()
    packed = packing.collate_packed([data], pad_id=0)  # all rows in one sequence
    s0, n0, _ = loss_and_grads(model, collate(data, pad_id=0))
    s1, n1, _ = loss_and_grads(model, packed)
    assert n0 == n1 and abs(float(s1 - s0)) > 1e-2  # OPT packed would be wrong: rows see each other ...
    why = packing.check(model)
    assert "OPTForCausalLM" in why and "row boundary" in why  # ... and the check says so
    with pytest.raises(ValueError, match="--packing: OPTForCausalLM.*without --packing"):
        packing.choose(model, True, print)
    said = []
    assert packing.choose(model, None, said.append) is False
    assert said and said[0].startswith("packing off: OPTForCausalLM")
    assert packing.choose(adapted(tiny_llama), None, said.append) is True


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bs,accum", [(2, 2), (1, 3)])
def test_fit_packed_trains_the_padded_adapter(tmp_path, bs, accum):
    """Same rows per step, same token-normalised loss: the packed run ends where the padded run ends."""
    data = examples(24)
    runs, stats = {}, {}
    for pack in (False, True):
        model = model_with_adapter()
        cfg = config(tmp_path / str(pack), steps=4, batch_size=bs, grad_accum=accum, max_len=40, packing=pack)
        fitted = fit(model, data, cfg, pad_id=0, stream=io.StringIO())
        runs[pack], stats[pack] = adapter_state(model), fitted.packing
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], atol=1e-5, rtol=0, msg=k)
    assert stats[True]["packed"] and not stats[False]["packed"]
    if bs > 1:  # (a micro-batch of 1 x 40 tokens leaves rows of up to 20 tokens little to share)
        assert stats[True]["sequences"] < stats[True]["rows"]  # rows really shared sequences
    assert stats[True]["rows"] == stats[False]["rows"] == 4 * bs * accum
    assert stats[True]["real_tokens"] == stats[False]["real_tokens"]
    assert stats[False]["computed_tokens"] == stats[False]["padded_tokens"]
    assert stats[True]["micro_batches"] <= stats[False]["micro_batches"] == 4 * accum


def test_fit_reports_packing_in_the_log(tmp_path):
    log = io.StringIO()
    fit(model_with_adapter(), examples(16), config(tmp_path, steps=2, max_len=64), pad_id=0, stream=log)
    text = log.getvalue()
    assert "packing: each step's rows in sequences, at most 128 tokens a micro-batch" in text
    found = re.search(r"packing: 8 rows in (\d+) sequences .*, (\d+) micro-batches; ([\d.]+)% of the tokens "
                      r"computed are real \(padded micro-batches: ([\d.]+)%\)", text)  # fmt: skip
    assert found, text
    assert int(found[1]) < 8 and int(found[2]) <= 4  # padded: 8 sequences in 2 x 2 micro-batches
    assert float(found[4]) < float(found[3]) <= 100.0


def test_fit_falls_back_to_padding_for_opt(tmp_path):
    data, out = examples(8), {}
    for pack in (None, False):
        model = tiny_opt()
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
        log = io.StringIO()
        fitted = fit(model, data, config(tmp_path / str(pack), steps=2, packing=pack), pad_id=0, stream=log)
        out[pack] = adapter_state(model)
        assert not fitted.packing["packed"]
    assert "packing off: OPTForCausalLM" in log.getvalue() or pack is False
    for k in out[None]:
        torch.testing.assert_close(out[None][k], out[False][k], atol=0, rtol=0)
    model = tiny_opt()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    with pytest.raises(ValueError, match="--packing: OPTForCausalLM"):
        fit(model, data, config(tmp_path / "forced", steps=1, packing=True), pad_id=0, stream=io.StringIO())


def test_packing_and_compile_options():
    from lorakit.cli import build_parser
    from lorakit.train.cmd_train import resolve
    from lorakit.train.config import TrainConfig

    parse = build_parser().parse_args
    base = ["train", "--data", "x.jsonl"]
    assert resolve(parse(base)).packing is None and resolve(parse(base)).compile is False
    assert resolve(parse([*base, "--packing"])).packing is True
    assert resolve(parse([*base, "--no-packing"])).packing is False
    assert resolve(parse([*base, "--compile"])).compile is True
    with pytest.raises(ValueError, match="--packing='yes' is invalid"):
        TrainConfig(packing="yes")


@pytest.mark.slow
def test_fit_compiled_trains_the_eager_adapter(tmp_path):
    data, out = examples(16), {}
    for on in (False, True):
        model = model_with_adapter()
        fit(model, data, config(tmp_path / str(on), steps=3, compile=on), pad_id=0, stream=io.StringIO())
        out[on] = adapter_state(model)
        assert getattr(model.base_model, "_compiled_call_impl", None) is None  # dropped after training
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], atol=1e-5, rtol=0, msg=k)
