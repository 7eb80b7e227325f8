"""Packed rows' attention computed row by row (train/row_attention.py): equal to the padded path on three
families, taken only for packed calls, every other call exactly sdpa's, and the switch undone on exit."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from lorakit.data import collate
from lorakit.train import packing, row_attention
from lorakit.train.loop import fit
from test_packing import adapted, loss_and_grads, rows, tiny_qwen2
from train_tiny import config, examples, model_with_adapter


def counting(monkeypatch):
    """Count the sequences split into rows (calls of row_attention.segments)."""
    calls = []
    real = row_attention.segments

    def spy(positions):
        calls.append(positions.shape[0])
        return real(positions)

    monkeypatch.setattr(row_attention, "segments", spy)
    return calls


def test_segments_start_at_each_zero_position():
    assert row_attention.segments(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])) == [(0, 3), (3, 5), (5, 6), (6, 8)]
    assert row_attention.segments(torch.tensor([4, 5, 0, 1])) == [(0, 2), (2, 4)]


@pytest.mark.parametrize("build,chunk", [(tiny_llama, 0), (tiny_llama, 16), (tiny_gpt2, 0), (tiny_qwen2, 0)])
def test_row_attention_equals_the_padded_path(build, chunk, monkeypatch):
    model = adapted(build, "sdpa")
    data = rows()
    bins = packing.pack_bins([len(r.input_ids) for r in data], 24)
    assert len(bins) < len(data)
    packed = packing.collate_packed([[data[i] for i in b] for b in bins], pad_id=0)
    s0, n0, g0 = loss_and_grads(model, collate(data, pad_id=0), chunk)
    calls = counting(monkeypatch)
    with row_attention.row_attention(model) as switched:
        assert switched and model.config._attn_implementation == row_attention.NAME
        s1, n1, g1 = loss_and_grads(model, packed, chunk)
    assert model.config._attn_implementation == "sdpa"
    assert len(calls) == model.config.num_hidden_layers * len(bins)  # every layer, every bin, row by row
    assert n1 == n0
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-5, msg=k)


def test_calls_that_are_not_packed_are_sdpa_bit_for_bit(monkeypatch):
    """A padded batch (attention_mask, no restarts) and generation with a KV cache: the very sdpa outputs."""
    model = adapted(tiny_llama, "sdpa")
    padded = collate(rows(), pad_id=0)
    ids = padded["input_ids"][:2, :6]
    with torch.no_grad():
        ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        ref_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
        calls = counting(monkeypatch)
        with row_attention.row_attention(model):
            out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls == []
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)


def test_the_switch_is_undone_on_error_and_skipped_off_sdpa():
    model = adapted(tiny_llama, "sdpa")
    with pytest.raises(RuntimeError, match="boom"):
        with row_attention.row_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    eager = adapted(tiny_llama, "eager")
    with row_attention.row_attention(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"
    with row_attention.row_attention(model, on=False) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"


def test_fit_packed_runs_rows_attention_and_restores_sdpa(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    model = model_with_adapter()
    assert model.config._attn_implementation == "sdpa"
    fitted = fit(model, examples(16), config(tmp_path, steps=2, max_len=64), pad_id=0, stream=io.StringIO())
    assert fitted.packing["packed"] and calls  # the packed micro-batches went row by row
    assert model.config._attn_implementation == "sdpa"
