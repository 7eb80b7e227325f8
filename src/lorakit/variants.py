"""Adapter kinds (variants): what one adapter does to one layer, in one object per kind.

A layer holds, per adapter, its tensors (`LoraWeights`) and the variant that gives them meaning; the layer
itself knows only its shape-specific math (Linear / Conv1D / Embedding / Conv2d: `layer._lora_branch`,
`layer._delta_weight`, `layer._weight_out_in`). Every variant is built on the primitives of functional.py.

    branch(layer, w, x, y)   differentiable: what adapter w adds to the base output y for input x
    add_(layer, w, y, x)     the same, no grad, in place into y (inference and per-row serving)
    merge / unmerge          fold into / take out of the base weight
    slot_factors(layer, w)   (A, s·B', row scale or None) for a per-row slot (fast/rows.py, slots.py)
    file_kinds               the tensors an adapter file carries per module ("A", "B", "magnitude")
    fast_train               whether the hand-derived training Function (fast/linear.py) computes it

A new kind plugs in here: subclass `LoraVariant`, register it in `VARIANTS`, and make `variant_for` pick it
from the config (PEFT's `LoraVariant` idea, keeping DoRA and friends out of the layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from . import functional as LF


class LoraVariant:
    """Plain LoRA: y += s · (x Aᵀ) Bᵀ, ΔW = s · B A, on every layer kind."""

    kind = "lora"
    file_kinds: tuple[str, ...] = ("A", "B")
    fast_train = True  # LoraLinearFunction computes it
    linear_only = False  # True: only Linear / Conv1D layers can carry it
    exclusive = False  # True: cannot be active beside other adapters on one layer

    def create(self, layer, w) -> None:
        """Extra tensors this kind needs on `w` once A and B exist (none for plain LoRA)."""

    def branch(self, layer, w, x: Tensor, y: Tensor | None) -> Tensor:
        return layer._lora_branch(w, x)

    @torch.no_grad()
    def add_(self, layer, w, y: Tensor, x: Tensor) -> None:
        layer._lora_add_(w, y, x)

    def merge(self, layer, w) -> None:
        layer.weight.add_(layer._delta_weight(w).to(layer.weight.dtype))

    def unmerge(self, layer, w) -> None:
        layer.weight.sub_(layer._delta_weight(w).to(layer.weight.dtype))

    def slot_factors(self, layer, w) -> tuple[Tensor, Tensor, Tensor | None]:
        """(A (r, in), s·B (out, r), None): what a per-row slot holds (Linear-like layers)."""
        return w.A.detach(), w.B.detach() * w.scale, None

    def tensors(self, w) -> dict[str, Tensor]:
        """The adapter-file tensors of `w` by kind (see io/keys.py)."""
        return {"A": w.A, "B": w.B}


class DoraVariant(LoraVariant):
    """DoRA: y_dora = m / ||W + ΔW|| · (W + ΔW) x, per output row; Linear and Conv1D only.

    It rescales the whole output, so it cannot share a layer with other active adapters (set_adapter refuses).
    """

    kind = "dora"
    file_kinds = ("A", "B", "magnitude")
    fast_train = False  # the plain path (autograd through functional.dora_linear)
    linear_only = True
    exclusive = True

    def create(self, layer, w) -> None:
        with torch.no_grad():
            W = layer._weight_out_in().to(w.A.dtype)
            w.magnitude = nn.Parameter(LF.weight_norm(W, LF.delta_weight(w.A, w.B, w.scale)))

    def branch(self, layer, w, x: Tensor, y: Tensor | None) -> Tensor:
        x = x.to(w.A.dtype)
        base_out = None
        if y is not None and not (w.dropout > 0 and layer.training):
            base_out = y.to(x.dtype) if layer.bias is None else (y - layer.bias).to(x.dtype)
        return LF.dora_linear(
            x, layer._weight_out_in(), base_out, w.A, w.B, w.magnitude, w.scale, w.dropout, layer.training
        )

    @torch.no_grad()
    def add_(self, layer, w, y: Tensor, x: Tensor) -> None:
        ratio = LF.dora_ratio(layer._weight_out_in(), w.A, w.B, w.magnitude, w.scale)
        LF.dora_rescale_base_(y, ratio - 1, layer.bias)
        LF.lora_into_(y, x, w.A, w.B * ratio.unsqueeze(1), w.scale)

    def merge(self, layer, w) -> None:
        delta = layer._to_out_in(layer._delta_weight(w))
        W = layer._weight_out_in().to(delta.dtype)
        merged, w.merged_norm = LF.dora_merged_weight(W, delta, w.magnitude)
        layer._set_weight_out_in(merged)

    def unmerge(self, layer, w) -> None:
        delta = layer._to_out_in(layer._delta_weight(w))
        W = layer._weight_out_in().to(delta.dtype)
        layer._set_weight_out_in(LF.dora_unmerged_weight(W, delta, w.magnitude, w.merged_norm))
        w.merged_norm = None

    def slot_factors(self, layer, w) -> tuple[Tensor, Tensor, Tensor | None]:
        """(A, s · ratio ⊙ B, ratio - 1): the slot's rows rescale their base output by `ratio` (fast/rows)."""
        ratio = LF.dora_ratio(layer._weight_out_in(), w.A, w.B, w.magnitude, w.scale).detach()
        return w.A.detach(), (w.B.detach() * ratio.unsqueeze(1)) * w.scale, ratio - 1

    def tensors(self, w) -> dict[str, Tensor]:
        return {"A": w.A, "B": w.B, "magnitude": w.magnitude}


VARIANTS: dict[str, LoraVariant] = {"lora": LoraVariant(), "dora": DoraVariant()}


def variant_for(use_dora: bool) -> LoraVariant:
    """The variant an adapter config asks for (the one place a new kind is chosen)."""
    return VARIANTS["dora" if use_dora else "lora"]
