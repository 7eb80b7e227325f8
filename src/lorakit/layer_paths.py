"""Which computation a Lora layer's call takes (the arithmetic: fast/, variants.py, functional.py).

Mixins of the layers in layers.py (they use its state: `lora`, `tokens`, `live_adapters()`, `base_class`):
- `RowsPath._forward_rows`: a mixed batch (`per_row_adapters`), each batch row with its own adapter;
- `FastLinearPath.forward`: a Linear-like layer takes a fast path of lorakit.fast wherever one applies, else
  the plain path (the next class's forward: layers.LoraLayer.forward).
Nothing here changes a layer's state.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from . import fast, rowstate
from .fast import rows as fast_rows
from .weights import LoraWeights


class RowsPath:
    """The per-row path of every Lora layer (LoraLayer.forward calls it when the step's mapping covers it)."""

    def _forward_rows(self, mapping, x: Tensor, y: Tensor) -> Tensor:
        """y (the base output for x) plus, on each batch row, that row's adapter (`mapping`: rowmapping.RowMapping).

        Trainable tokens first (as forward applies them), then LoRA: under no_grad from the per-row slots
        (stacked or by runs, fast/rows.py), with gradients from the adapters' own tensors, out of place.
        """
        tokens = self.tokens._modules  # (a plain dict: ModuleDict's `in` is a Python call per row group)
        for name, rows in mapping.groups.items() if tokens else ():
            if name in tokens:
                ys = self._apply_tokens(tokens[name], x.index_select(0, rows), y.index_select(0, rows))
                y = y.index_copy(0, rows, ys)
        slots = mapping.slots.layer_slots(self)
        if slots is not None and not torch.is_grad_enabled():
            return fast_rows.add_rows_(y, x, slots, mapping, self.bias)
        for name, rows in mapping.groups.items():
            if name not in self.lora:
                continue
            w = self.lora[name]
            xs, ys = x.index_select(0, rows), y.index_select(0, rows)
            if torch.is_grad_enabled():
                y = y.index_add(0, rows, w.variant.branch(self, w, xs, ys).to(y.dtype))
            else:
                w.variant.add_(self, w, ys, xs)
                y.index_copy_(0, rows, ys)
        return y


class FastLinearPath:
    """The path choice of a Linear-shaped layer (layers.LinearLike), before the plain path:
    - a mixed batch (`per_row_adapters`): the plain path, whose per-row branch is `RowsPath._forward_rows`;
    - no gradient needed: the base output, then each live adapter's no-grad `add_` in place;
    - training one plain LoRA adapter on a frozen float nn.Linear / Conv1D: the hand-derived Function,
      fused with the sibling projections that read the same x (`fused`, fast/fused.py).
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # torch.compile traces the plain path (functional.lora_linear): it compiles without graph breaks.
        # A mixed batch takes the plain path's per-row branch (LoraLayer.forward), asked before fast.enabled():
        # a decode step calls this on every layer, 210 times.
        if torch.compiler.is_compiling() or args or kwargs or self.disabled or rowstate.current() is not None:
            return super().forward(x, *args, **kwargs)
        if not fast.enabled():
            return super().forward(x)
        live = self.live_adapters()
        if not live or any(n in self.tokens for n in live):
            return super().forward(x, *args, **kwargs)
        ws = [self.lora[n] for n in live]
        if not self._needs_grad(x, ws):
            if self.training and any(w.dropout > 0 for w in ws):
                return super().forward(x)  # dropout in train mode without grad: rare; the plain path draws it
            y = self.base_class.forward(self, x)  # the exact base output (quantized bases included)
            for w in ws:
                w.variant.add_(self, w, y, x)
            return y
        if not self.fast_trainable(x):
            return super().forward(x)
        if self.fused is not None:
            return self.fused.forward(self, x)
        p, conv1d = self.train_dropout(), self._conv1d()
        return fast.lora_linear_train(x, [self.train_factors()], p, conv1d, self.recompute_input)[0]

    def _needs_grad(self, x: Tensor, ws: list[LoraWeights]) -> bool:
        if not torch.is_grad_enabled():
            return False
        if (
            x.requires_grad
            or self.weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        ):
            return True
        return any(p.requires_grad for w in ws for p in w.parameters())

    def fast_trainable(self, x: Tensor) -> bool:
        """Whether the hand-derived Function computes this layer for x now: exactly one live adapter, of a
        variant it supports, no trainable tokens, a frozen float base of the plain class, no autocast."""
        live = self.live_adapters()
        W = self.weight
        return (
            len(live) == 1
            and live[0] in self.lora
            and not self.tokens
            and self.lora[live[0]].variant.fast_train
            and self.base_class in (nn.Linear, Conv1D)  # a quantized subclass keeps its own forward
            and not W.requires_grad
            and W.is_floating_point()
            and x.dtype == W.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def train_factors(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor, float]:
        """(W (out, in), b, A, B, scale) of the one live adapter, for fast.lora_linear_train."""
        w = self.lora[self.live_adapters()[0]]
        W = self.weight.t() if self._conv1d() else self.weight
        return W, self.bias, w.A, w.B, w.scale

    def train_dropout(self) -> float:
        return self.lora[self.live_adapters()[0]].dropout if self.training else 0.0
