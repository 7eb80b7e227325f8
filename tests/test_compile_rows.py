"""--compile over packed rows: the rows' compiled attention equals the padded path (eager and compiled in one
graph), and a compiled multi-micro-batch run compiles once, not once per micro-batch length."""

from __future__ import annotations

import io

import pytest
import torch
from torch._dynamo.utils import counters

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.data import collate
from lorakit.train import packing, row_attention_compiled
from lorakit.train.loop import fit
from lorakit.train.row_attention import row_attention
from test_packing import loss_and_grads, rows, tiny_qwen2
from train_tiny import config, examples


def adapted(build=tiny_llama, layers=2):
    model = build()
    model.config.num_hidden_layers, model.model.layers = layers, model.model.layers[:layers]
    model.config._attn_implementation = "sdpa"
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, targets="all-linear"))
    randomize_adapters(model)  # B != 0: the adapter's gradients are not trivial
    return model.train()


def assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1] == ref[1]
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("chunk", [0, 16])
def test_compiled_rows_attention_eager_equals_padded(chunk):
    for build in (tiny_llama, tiny_qwen2):
        model, data = adapted(build), rows(5, seed=1)
        padded = loss_and_grads(model, collate(data, pad_id=0), chunk)
        # Two bins of different widths: the narrower one ends in a segment of pads.
        packed = packing.collate_packed([data[:3], data[3:]], pad_id=0)
        with row_attention(model, compiled=True) as switched:
            assert switched and model.config._attn_implementation == row_attention_compiled.NAME
            assert_same(loss_and_grads(model, packed, chunk), padded)
        assert model.config._attn_implementation == "sdpa"


def test_compiled_rows_attention_one_graph_for_every_length():
    """fullgraph (no graph break), dynamic lengths: three packed micro-batches of different lengths and row
    counts run through one graph and each equals its padded reference. (aot_eager: dynamo's graph and
    AOTAutograd's joint forward/backward, as inductor gets them, without inductor's code generation.)"""
    model, body = adapted(layers=1), None  # one layer: half the tracing, the same graph structure
    parts = [rows(n, seed) for seed, n in ((2, 4), (3, 6), (4, 2))]
    padded = [loss_and_grads(model, collate(data, pad_id=0)) for data in parts]  # eager, sdpa
    torch._dynamo.reset()
    counters.clear()
    with row_attention(model, compiled=True) as switched:
        assert switched
        body = model.base_model
        body.compile(fullgraph=True, dynamic=True, backend="aot_eager")
        try:
            for data, ref in zip(parts, padded):
                layout = packing.sequences([len(r.input_ids) for r in data], budget=10**6)
                assert layout == [[list(range(len(data)))]]  # one micro-batch of one sequence
                batch = packing.collate_packed([data], pad_id=0)
                assert_same(loss_and_grads(model, batch, chunk=8), ref)
        finally:
            body._compiled_call_impl = None
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_rows_attention_refused_where_its_mask_would_be_needed():
    model = adapted()
    model.config.attention_dropout = 0.1
    with row_attention(model, compiled=True) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"
    assert row_attention_compiled.refusal(model.config) == "attention dropout 0.1"


@pytest.mark.slow  # one inductor compile of a 1-layer model's forward and backward (~45 s on one busy CPU thread)
def test_fit_compiled_packed_compiles_once(tmp_path):
    """A compiled packed run of 4 steps (4 micro-batches of 4 different lengths) compiles the body once and
    trains the eager run's adapter. Before: a static graph, then a dynamic one (2), the rows' attention off."""
    data, out = examples(16), {}
    for on in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(1)
        model = tiny_llama()
        model.config.num_hidden_layers, model.model.layers = 1, model.model.layers[:1]
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
        log = io.StringIO()
        fit(model, data, config(tmp_path / str(on), steps=4, compile=on), pad_id=0, stream=log)
        out[on] = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        assert not on or "16 rows in 4 sequences (4.0 rows each), 4 micro-batches" in log.getvalue()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], atol=1e-5, rtol=0, msg=k)
