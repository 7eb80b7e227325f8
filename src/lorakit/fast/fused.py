"""Shared-input projections (q/k/v, gate/up) trained as one call of the hand-derived Function.

An attention block calls q_proj(x), k_proj(x), v_proj(x) one after the other on the very same tensor x. The
first of them to run computes all the group's outputs in one `LoraLinearFunction` (one matmul of x with the
stacked A, one saved x, one dropout mask, one dx accumulated in place in backward) and hands each sibling its
output when the sibling is called with that same x (tensor identity and version). While outputs are held
for one x, a sibling called with another x computes alone (the held ones stay for their siblings).

The hand-over lives in a `Scope`: one per call of the siblings' parent module (the attention / MLP block),
opened by a forward pre-hook and closed by a forward hook registered with `always_call=True`, so a parent that
raises (or that checkpointing's early stop interrupts) closes it too. Nothing survives the parent's call: an
output no sibling asked for is dropped with the scope, and the group holds no tensor between calls. Fusion
happens only inside an open scope; a sibling called outside its parent's call, or when the group does not
qualify (see `forward`), computes alone: correct either way, only the fusion is lost.

- Gradient checkpointing re-runs the parent in backward: the re-run opens its own scope and fuses again.
- Without autograd (inference) the layers never reach the group, so no scope is opened.
- Under torch.compile the layers take the plain path (layers.LinearLike.forward) and the hooks open nothing.

Groups are made explicitly, when adapters are added or removed (adapters.link_fused): siblings of one parent
whose leaf names form one of FUSED_SETS, skipping cross-attention blocks (their k/v read another input).
`link(parent)` registers the two hooks, `unlink()` removes them (link_fused unlinks the old groups first).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import lora_linear_train

FUSED_SETS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)
CROSS_ATTENTION_NAMES = ("encoder_attn", "crossattention", "cross_attn", "EncDecAttention")


class Scope:
    """One call of the parent: the outputs the first sibling computed for x (at x's version), per sibling,
    until that sibling takes its own."""

    __slots__ = ("outputs", "version", "x")

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.version = -1
        self.outputs: dict = {}

    def take(self, layer, x: Tensor) -> Tensor | None:
        """`layer`'s held output for x (then no longer held), or None."""
        if self.x is not x or self.version != x._version or layer not in self.outputs:
            return None
        out = self.outputs.pop(layer)
        if not self.outputs:
            self.x = None
        return out

    def hold(self, x: Tensor, outputs: dict) -> None:
        """Hold `outputs` ({sibling: output for x}) in place of anything held before."""
        self.x, self.version, self.outputs = x, x._version, outputs


class FusedGroup:
    """The sibling layers (LinearLike, same input width) that read one input; see the module docstring.

    `scope` is the open Scope while the parent runs with autograd on, else None.
    """

    def __init__(self, members: list) -> None:
        self.members = members
        self.scope: Scope | None = None
        self._hooks: list = []

    def link(self, parent: nn.Module) -> None:
        """Open a Scope on each call of `parent` and close it when the call returns or raises."""
        self.unlink()
        self._hooks = [
            parent.register_forward_pre_hook(self._open),
            parent.register_forward_hook(self._close, always_call=True),
        ]

    def unlink(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.scope = None

    def _open(self, module: nn.Module, args) -> None:
        # A nested call of the same parent starts afresh (the outer call's siblings then compute alone).
        fuse = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        self.scope = Scope() if fuse else None

    def _close(self, module: nn.Module, args, output) -> None:
        self.scope = None

    def forward(self, layer, x: Tensor) -> Tensor:
        """`layer`'s training output for x. The caller (LinearLike.forward) checked `layer.fast_trainable(x)`."""
        scope, members = self.scope, [layer]
        if scope is not None:
            out = scope.take(layer, x)
            if out is not None:
                return out
            if not scope.outputs:  # nothing held: fuse the group (held for another x: compute alone)
                members = [m for m in self.members if m is layer or self._joins(m, layer, x)]
        if len(members) == 1:
            p, conv1d = layer.train_dropout(), layer._conv1d()
            return lora_linear_train(x, [layer.train_factors()], p, conv1d, layer.recompute_input)[0]
        factors = [m.train_factors() for m in members]
        outs = lora_linear_train(x, factors, layer.train_dropout(), False, layer.recompute_input)
        scope.hold(x, {m: y for m, y in zip(members, outs) if m is not layer})
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
