"""What a registered adapter puts in the slots, built once from its validated file (`slot_content`).

Making an adapter resident is then vLLM's `set_lora(index)`: `RowSlots.write` copies these tensors into the
preallocated stacks and puts the few per-module records on their modules; eviction (`RowSlots.evict`) zeroes
the slot and takes the records off. Nothing is wrapped, fingerprinted or validated per load: the modules are
wrapped here, once, at registration, and the base weights cannot change under a running server, so what
depends on them (DoRA's m / ||W + ΔW||) is computed here too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from lorakit.inject import tied_heads
from lorakit.io import PreparedAdapter
from lorakit.layers import LinearLike, LoraLayer, adapter_dtype
from lorakit.saved import SavedModule, unwrap_saved
from lorakit.slots import RowSlots, SlotContent
from lorakit.variants import variant_for
from lorakit.weights import LoraWeights, TokenWeights


def slot_content(slots: RowSlots, prepared: PreparedAdapter) -> SlotContent:
    """`prepared`'s tensors as the slots take them (see `lorakit.slots.SlotContent`), its modules wrapped on
    `slots.model` now (`RowSlots.host`). Factors stay on the CPU (the cache), records on the model's device.

    Raises RuntimeError (a module another adapter holds as another kind), TypeError (a module LoRA cannot wrap).
    """
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, even on the engine thread
        factors, records = {}, {}
        for path, found in prepared.plan.lora.items():
            layer = slots.host(path, "lora")
            w = _weights(layer, path, found, prepared)
            if isinstance(layer, LinearLike):
                factors[path] = tuple(
                    None if t is None else t.detach().cpu() for t in w.variant.slot_factors(layer, w)
                )
            else:  # an Embedding / Conv2d: per-row serving reads the layer's own record (layers._forward_rows)
                records.setdefault(path, []).append(("lora", w))
        for path, (ids, values) in prepared.plan.tokens.items():
            layer = slots.host(path, "tokens")
            dtype = adapter_dtype(layer.weight)
            t = TokenWeights(
                list(ids), values.to(layer.weight.device, dtype, copy=True), layer.weight.shape[0]
            )
            records.setdefault(path, []).append(("tokens", t))
            if isinstance(layer, nn.Embedding):  # a tied head reads the same rows: the same record
                for head, _ in tied_heads(slots.model, path):
                    slots.host(head, "tokens")
                    records.setdefault(head, []).append(("tokens", t))
        for path, state in prepared.plan.saved.items():
            layer = slots.host(path, "lora_copies")
            own = _saved_copy(layer, state)
            records.setdefault(path, []).append(("lora_copies", own))
            if isinstance(layer, nn.Embedding):
                for head, _ in tied_heads(slots.model, path):
                    if head not in prepared.plan.saved:
                        shared = _tied_copy(slots.host(head, "lora_copies"), own)
                        records.setdefault(head, []).append(("lora_copies", shared))
    nbytes = sum(t.numel() * t.element_size() for f in factors.values() for t in f if t is not None)
    nbytes += sum(
        t.numel() * t.element_size() for rs in records.values() for _, r in rs for t in r.parameters()
    )
    return SlotContent(factors, records, nbytes)


def _weights(layer: LoraLayer, path: str, found: dict[str, Tensor], prepared: PreparedAdapter) -> LoraWeights:
    """The file's factors as the LoraWeights `load_prepared` would make on `layer` (the adapter dtype)."""
    config, dtype, device = prepared.config, adapter_dtype(layer.weight), layer.weight.device
    A, B = (found[k].to(device, dtype, copy=True) for k in ("A", "B"))
    variant = variant_for(config.use_dora)
    if variant.linear_only and not isinstance(layer, LinearLike):
        raise TypeError(f"{prepared.source}: {variant.kind} on {path!r} needs a Linear or Conv1D layer")
    w = LoraWeights(A, B, config.alpha_for(path), config.use_rslora, 0.0, variant)
    if "magnitude" in found:
        w.magnitude = nn.Parameter(found["magnitude"].to(device, dtype, copy=True))
    return w


def _saved_copy(layer: SavedModule, state: dict[str, Tensor]) -> nn.Module:
    """The adapter's copy of `layer`'s module holding `state` (what add_copy + load_state_dict make), without
    copying the base module's tensors first (a copy of an embedding is large)."""
    base = unwrap_saved(layer)  # a new object of the base class, sharing the base's tensors
    if base._modules:  # a module with children: the plain way
        own = copy.deepcopy(base)
        own.load_state_dict(state, strict=True)
        return own.requires_grad_(False)
    base._parameters = {
        k: None if p is None else nn.Parameter(state[k].to(p.device, p.dtype, copy=True), requires_grad=False)
        for k, p in base._parameters.items()
    }
    base._buffers = {
        k: b if b is None or k not in state else state[k].to(b.device, b.dtype, copy=True)
        for k, b in base._buffers.items()
    }
    return base


def _tied_copy(head: SavedModule, emb_copy: nn.Module) -> nn.Module:
    """A tied head's copy: its Linear over the embedding copy's weight (as adapters._tie_saved_heads makes)."""
    own = unwrap_saved(head)
    own._parameters = {**head._parameters, "weight": emb_copy.weight}
    if own._parameters.get("bias") is not None:
        own._parameters["bias"] = nn.Parameter(own._parameters["bias"].detach().clone(), requires_grad=False)
    own._buffers = dict(head._buffers)
    return own
