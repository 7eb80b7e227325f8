"""The rows' attention in a form torch.compile traces without graph breaks or recompiles ("lorakit_rows_compiled").

`row_attention.rows_attention_forward` reads the row boundaries from the position ids with Python control flow
(`.tolist()`, one sdpa call per row): under torch.compile that is a graph break per layer and a guard on values
that change with every micro-batch. Here the same computation is one opaque operator, `lorakit::rows_attention`
(`torch.library.custom_op`): the compiled graph sees a (B, H, L, D) -> (B, H, L, D) call whose output shape is its
query's, whatever L is, and the operator runs eagerly inside the graph, sdpa with is_causal=True on each row's
segment (a sequence without a restart is one segment: plain causal attention). Its backward,
`lorakit::rows_attention_backward`, recomputes each segment's attention and differentiates it (the forward
saves only q, k, v: one more attention forward per layer in backward, no (L, L) mask anywhere).

The mask function registered under the same name returns None for a call without a padding mask and without a
cache offset (a training micro-batch, packed or not): sdpa's (B, 1, L, L) packed mask is never built, and the
attention function routes exactly those calls (attention_mask None, queries as long as keys, position ids
given) to the operator. Every other call (a padding mask, a KV cache) gets sdpa's own mask and sdpa.
`row_attention(model, compiled=True)` checks that a model then still keeps packed rows apart (`packing.check`:
a family that does not hand the position ids to its attention function would not) before training with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .row_attention import EXOTIC, batch_segments

NAME = "lorakit_rows_compiled"


@torch.library.custom_op("lorakit::rows_attention", mutates_args=())
def rows_attention_op(query: Tensor, key: Tensor, value: Tensor, positions: Tensor, scale: float) -> Tensor:
    """query / key / value (B, H, L, D) (key and value already repeated to H heads), positions (B or 1, L) ->
    (B, H, L, D): each row's causal attention over its own segment (rows start where a position id is 0)."""
    out = torch.empty_like(query)
    for b, segs in enumerate(batch_segments(positions, query.shape[0])):
        for s, e in segs:
            q, k, v = query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]
            out[b : b + 1, :, s:e] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out


@rows_attention_op.register_fake
def _(query, key, value, positions, scale):
    return torch.empty_like(query)


@torch.library.custom_op("lorakit::rows_attention_backward", mutates_args=())
def rows_attention_backward_op(
    grad: Tensor, query: Tensor, key: Tensor, value: Tensor, positions: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (dq, dk, dv) of `rows_attention_op` for the output gradient `grad`: each segment's sdpa is
    recomputed and differentiated (`torch.func.vjp` of the same sdpa call as the forward)."""
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    # torch.func.vjp, not autograd.grad: an operator's body runs below the autograd dispatch key.
    for b, segs in enumerate(batch_segments(positions, query.shape[0])):
        for s, e in segs:
            _, vjp = torch.func.vjp(attend, *(t[b : b + 1, :, s:e] for t in (query, key, value)))
            gq, gk, gv = vjp(grad[b : b + 1, :, s:e])
            dq[b : b + 1, :, s:e], dk[b : b + 1, :, s:e], dv[b : b + 1, :, s:e] = gq, gk, gv
    return dq, dk, dv


@rows_attention_backward_op.register_fake
def _(grad, query, key, value, positions, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup(ctx, inputs, output):
    query, key, value, positions, scale = inputs
    ctx.save_for_backward(query, key, value, positions)
    ctx.scale = scale


def _backward(ctx, grad):
    query, key, value, positions = ctx.saved_tensors
    dq, dk, dv = rows_attention_backward_op(grad.contiguous(), query, key, value, positions, ctx.scale)
    return dq, dk, dv, None, None


rows_attention_op.register_autograd(_backward, setup_context=_setup)


def rows_attention_compiled_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw
):
    """transformers' attention-function contract: query (B, H, L, D), key / value (B, H_kv, S, D) ->
    (output (B, L, H, D), None). A call without a mask (see the module docstring) goes to the operator.

    Raises:
        ValueError: such a call with attention dropout, or with an option per-row sdpa cannot honour (its mask
            was not built, so sdpa cannot take it instead); `row_attention` refuses such models up front.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    positions = kw.get("position_ids")
    rows = attention_mask is None and isinstance(positions, Tensor) and key.shape[2] == query.shape[2]
    if not rows or not getattr(module, "is_causal", True) or kw.get("is_causal") is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kw)
    exotic = [k for k in EXOTIC if kw.get(k) is not None]
    if dropout or exotic:
        raise ValueError(
            f"{NAME}: attention {'dropout ' + str(dropout) if dropout else exotic[0]} is not supported by the "
            "rows' compiled attention (train without --compile, or with attention dropout 0)"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = rows_attention_op(query, key, value, positions, scale)
    return out.transpose(1, 2).contiguous(), None


def rows_mask(*args, attention_mask=None, q_offset=0, kv_offset=0, **kwargs):
    """sdpa's mask function, except None (no mask) for a call without a padding mask or a cache offset: the
    attention function then computes the rows' attention from the position ids. Any other call gets a mask
    tensor, never None (not even for an all-ones padding mask, which sdpa would skip)."""
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs.get("q_length", args[1] if len(args) > 1 else None)
    kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    plain = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if attention_mask is None and plain and q_length == kv_length:
        return None
    # Never None otherwise (sdpa skips an all-ones padding mask): None is what routes a call to the operator.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, attention_mask=attention_mask, q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def refusal(config) -> str:
    """'' if a model of this config can train with NAME; otherwise why not (attention dropout, a sliding window,
    soft-capping: each would need the mask this attention does not build)."""
    if getattr(config, "attention_dropout", 0.0):
        return f"attention dropout {config.attention_dropout}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"a sliding window ({config.sliding_window})"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention soft-capping"
    return ""


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, rows_attention_compiled_forward)
    AttentionMaskInterface.register(NAME, rows_mask)
