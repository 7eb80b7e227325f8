"""Fast paths for the Lora layers, used automatically wherever they apply (no flag), tested against the plain
path (`functional.py`) in tests/test_fast_*.py.

- Training, one active adapter on an nn.Linear / GPT-2 Conv1D with a frozen float weight:
  `linear.LoraLinearFunction`, a hand-derived backward that keeps one x per input tensor, a bool dropout
  mask instead of a dropped copy of x, and accumulates dx in place.
- Inference (no gradient needed), any number of active plain adapters on a Linear-like layer, quantized bases
  included: the base output plus one matmul and one in-place addmm_ per adapter.
- Per-row adapters (mixed batches, `per_row_adapters`): `rows.forward_rows`, contiguous runs of rows as views
  and in-place addmm_ under no_grad.
Everything else (DoRA, trainable tokens, several adapters while training, autocast, a trainable or
non-float base weight, Embedding, Conv2d) takes the plain path.

`plain_path()` switches the fast paths off inside a `with` block (for comparisons and debugging).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from .linear import add_lora_inplace, lora_linear_train

_state = threading.local()


@contextlib.contextmanager
def plain_path() -> Iterator[None]:
    """Inside, every Lora layer computes with the plain (reference) path of functional.py."""
    before = getattr(_state, "plain", False)
    _state.plain = True
    try:
        yield
    finally:
        _state.plain = before


def enabled() -> bool:
    return not getattr(_state, "plain", False)


def _needs_grad(x: Tensor, layer, weights) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (layer.bias is not None and layer.bias.requires_grad) or layer.weight.requires_grad:
        return True
    return any(w.A.requires_grad or w.B.requires_grad for w in weights)


def linear_forward(layer, x: Tensor) -> Tensor | None:
    """The output of a LinearLike layer by a fast path, or None where none applies (the caller goes plain)."""
    if not enabled() or layer.disabled or layer.row_plan is not None:
        return None
    names = [n for n in layer.active if n not in layer.merged]
    if any(n in layer.tokens or n not in layer.lora or layer.lora[n].magnitude is not None for n in names):
        return None
    weights = [layer.lora[n] for n in names]
    if not weights:
        return None
    if not _needs_grad(x, layer, weights):
        if layer.training and any(w.dropout > 0 for w in weights):
            return None  # dropout in train mode without grad: rare; the plain path draws it
        y = layer.base_class.forward(layer, x)  # the exact base output (quantized bases included)
        return add_lora_inplace(y, x, weights)
    W = layer.weight
    if (
        len(weights) != 1
        or layer.base_class not in (nn.Linear, Conv1D)  # a quantized subclass keeps its own forward
        or W.requires_grad
        or not W.is_floating_point()
        or x.dtype != W.dtype
        or torch.is_autocast_enabled(x.device.type)
    ):
        return None
    if layer.base_class is Conv1D:
        return lora_linear_train(x, W.t(), layer.bias, weights[0], layer.training, addmm_bias=True)
    return lora_linear_train(x, W, layer.bias, weights[0], layer.training, addmm_bias=False)
