"""Attention of packed rows computed row by row: each row's causal attention over its own tokens, nothing more.

A packed micro-batch holds several rows per sequence (`packing.collate_packed`: position ids restarting at 0 per
row, no attention_mask). Under "sdpa" transformers turns that into a block-diagonal causal mask (B, 1, L, L) and
the kernel scores every query of the sequence against every key before masking: ~L² per sequence, where the
rows need Σ nᵢ² / 2. On the end-to-end benchmark (bins of ~1000 tokens holding ~3 rows each) attention was a
third of the training step.

`row_attention(model)` switches a model whose attention is "sdpa" to the implementation registered here as
"lorakit_rows", and back on exit. For a packed call, i.e. position ids that restart inside a sequence, queries as
long as keys (no KV cache), no sliding window, soft-capping or attention sinks, it calls transformers' own
`sdpa_attention_forward` with is_causal=True on each row's segment and concatenates: the same attention each row
computes alone, so the loss and gradients are the padded path's up to float rounding. Every other call (padded
evaluation batches, generation, a row per sequence) goes to `sdpa_attention_forward` unchanged, with the mask
built by sdpa's own mask function (registered under the same name). Nothing is cached between calls: the row
boundaries are read from the position ids each call passes (a few hundred integers per layer).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

NAME = "lorakit_rows"
# The widest packed sequence `fit` makes under row attention (packing.plan's `widest`): rows' attention costs the
# same in any bin, but transformers still builds sdpa's (bins, 1, L, L) bool mask from the position ids (16 MB a
# bin at 4096 tokens), which this bounds.
WIDEST = 4096
EXOTIC = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")  # what per-row sdpa cannot honour


def segments(positions: Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] of one sequence's rows: a row starts wherever its position id is 0 (and at 0)."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], positions.shape[0]]))


def batch_segments(positions: Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """`segments` of each of `batch` sequences; positions (batch or 1, L) (one row of ids serves them all)."""
    if positions.shape[0] != batch:
        positions = positions.expand(batch, -1)
    return [segments(positions[b]) for b in range(batch)]


def rows_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query (B, H, L, D), key / value (B, H_kv, S, D) ->
    (output (B, L, H, D), None). Packed calls (see the module docstring) are computed row by row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    if not _packed(module, query, key, positions, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = []
    for b, segs in enumerate(batch_segments(positions, query.shape[0])):
        parts = [
            sdpa_attention_forward(
                module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], None,
                dropout=dropout, scaling=scaling, is_causal=True,
            )[0]
            for s, e in segs
        ]  # fmt: skip
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def _packed(module, query: Tensor, key: Tensor, positions, kwargs: dict) -> bool:
    if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.shape[-1] != query.shape[2]:
        return False
    if key.shape[2] != query.shape[2] or query.shape[2] < 2 or not getattr(module, "is_causal", True):
        return False
    if any(kwargs.get(k) is not None for k in EXOTIC) or kwargs.get("is_causal") is False:
        return False
    return bool((positions[:, 1:] == 0).any())  # a restart inside a sequence: rows are packed


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, rows_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # every non-packed call gets exactly sdpa's masks


@contextlib.contextmanager
def row_attention(model: torch.nn.Module, on: bool = True, compiled: bool = False):
    """Within the block, `model` (a transformers PreTrainedModel using "sdpa") computes packed rows' attention
    row by row; restored to "sdpa" on exit, also on an exception. Yields whether the switch was made: not when
    `on` is False, the model is not on "sdpa", or its family does not dispatch attention through transformers'
    AttentionInterface (then nothing changes and packed rows keep the block-diagonal mask).

    compiled: the form torch.compile traces in one graph (`row_attention_compiled`: an opaque operator, no mask
    built), switched only when the model's config allows it and the model, switched, still keeps packed rows
    apart (`packing.check`); otherwise nothing changes, as above."""
    from . import row_attention_compiled as rac

    config = getattr(model, "config", None)
    can = getattr(model, "_can_set_attn_implementation", None)
    if not on or getattr(config, "_attn_implementation", None) != "sdpa" or not callable(can) or not can():
        yield False
        return
    if compiled and rac.refusal(config):
        yield False
        return
    (rac.register if compiled else _register)()
    name = rac.NAME if compiled else NAME
    model.set_attn_implementation(name)
    try:
        switched = config._attn_implementation == name
        if switched and compiled:
            from .packing import check

            switched = check(model) == ""  # a family that drops the position ids would let rows mix
            if not switched:
                model.set_attn_implementation("sdpa")
        yield switched
    finally:
        model.set_attn_implementation("sdpa")
