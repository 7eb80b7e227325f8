"""The batch KV cache's growing layers: equal to concatenation, written in place while their room lasts."""

from __future__ import annotations

import torch

from conftest import tiny_llama
from lorakit.serve.kvcache import ROOM, BatchCache, GrowingLayer, new_cache


def test_growing_layer_equals_concatenation_and_writes_in_place():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    layer = GrowingLayer(keys, values, room=4)
    ref_k, ref_v, ptrs = keys, values, set()
    for step in range(3 * ROOM):
        n = 3 if step == 7 else 1  # one wider update on the way
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        out_k, out_v = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
        assert out_k is layer.keys and layer.get_seq_length() == ref_k.shape[2]
        ptrs.add(layer.keys.data_ptr())
    # Room 4, then doubling: 5 + 3·32 + 2 columns need a handful of buffers, not one per step.
    assert 2 <= len(ptrs) <= 5


def test_batch_cache_decodes_in_place_and_equals_a_plain_cache():
    model = tiny_llama().eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        plain = new_cache(model.config)
        out = model(input_ids=ids, past_key_values=plain, use_cache=True)
        batch = BatchCache(model.config)
        prefilled = new_cache(model.config)
        model(input_ids=ids, past_key_values=prefilled, use_cache=True)
        batch.extend(prefilled, [4, 4])
        nxt, ptr = out.logits[:, -1].argmax(-1, keepdim=True), None
        for _ in range(6):
            mask, positions = batch.step_inputs(ids.device)
            got = model(
                input_ids=nxt, attention_mask=mask, position_ids=positions, past_key_values=batch.cache
            )
            batch.advance()
            want = model(input_ids=nxt, past_key_values=plain, use_cache=True)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
            ptr = ptr or batch.cache.layers[0].keys.data_ptr()
            assert batch.cache.layers[0].keys.data_ptr() == ptr  # the column went into the room
            nxt = want.logits[:, -1].argmax(-1, keepdim=True)
        assert all(isinstance(layer, GrowingLayer) for layer in batch.cache.layers)
        batch.keep([1])  # a row leaves: rebuilt with fresh room, still equal
        torch.testing.assert_close(batch.cache.layers[0].keys, plain.layers[0].keys[1:], atol=0, rtol=0)
