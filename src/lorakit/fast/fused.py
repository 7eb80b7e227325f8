"""Shared-input projections (q/k/v, gate/up) trained as one call of the hand-derived Function.

An attention block calls q_proj(x), k_proj(x), v_proj(x) one after the other on the very same tensor x. The
first of them to run computes all the group's outputs in one `LoraLinearFunction` (one matmul of x with the
stacked A, one saved x, one dropout mask, one dx accumulated in place in backward) and hands each sibling its
output when the sibling is called with that same x (tensor identity and version). A sibling called with
another x, or when the group does not qualify (see `forward`), computes alone: correct either way, only the
fusion is lost. The hand-over holds the group's outputs from the first call to the last, nothing longer.

Groups are made explicitly, when adapters are added or removed (adapters.link_fused): siblings of one parent
whose leaf names form one of FUSED_SETS, skipping cross-attention blocks (their k/v read another input).
"""

from __future__ import annotations

from torch import Tensor

from .linear import lora_linear_train

FUSED_SETS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)
CROSS_ATTENTION_NAMES = ("encoder_attn", "crossattention", "cross_attn", "EncDecAttention")


class FusedGroup:
    """The sibling layers (LinearLike, same input width) that read one input; see the module docstring."""

    def __init__(self, members: list) -> None:
        self.members = members
        self._handover: tuple[Tensor, int, dict] | None = None  # (x, x._version, {layer: output})

    def forward(self, layer, x: Tensor) -> Tensor:
        """`layer`'s training output for x. The caller (LinearLike.forward) checked `layer.fast_trainable(x)`."""
        held = self._handover
        if held is not None and held[0] is x and held[1] == x._version and layer in held[2]:
            out = held[2].pop(layer)
            if not held[2]:
                self._handover = None
            return out
        self._handover = None
        members = [m for m in self.members if m is layer or self._joins(m, layer, x)]
        if len(members) == 1:
            p, conv1d = layer.train_dropout(), layer._conv1d()
            return lora_linear_train(x, [layer.train_factors()], p, conv1d, layer.recompute_input)[0]
        factors = [m.train_factors() for m in members]
        outs = lora_linear_train(x, factors, layer.train_dropout(), False, layer.recompute_input)
        rest = {m: y for m, y in zip(members, outs) if m is not layer}
        self._handover = (x, x._version, rest)
        return outs[members.index(layer)]

    @staticmethod
    def _joins(m, layer, x: Tensor) -> bool:
        # Same conditions as the caller's, and the same dropout and mode: one mask serves the whole group.
        return (
            m.training == layer.training
            and not m.disabled
            and m.fast_trainable(x)
            and m.train_dropout() == layer.train_dropout()
            and not m._conv1d()
            and not layer._conv1d()
        )
