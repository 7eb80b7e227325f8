"""Merging active adapters into the base weights (and back out), and unloading to a plain model."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import param_lora
from .adapters import (
    active_adapters,
    adapter_layers,
    adapter_records,
    link_fused,
    lora_layers,
    replace_module,
)
from .inject import model_modules, tied_to
from .layers import LoraLayer, unwrap, unwrap_saved


def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Fold the active adapters (or `names`, which must be active) into W: inference at base speed.

    Never writes a non-finite weight: a merge that would leave NaN / inf in W is undone (W restored
    exactly) and refused.

    Raises:
        RuntimeError: something is merged already (unmerge first), or a base weight is quantized.
        ValueError: a name in `names` is not active, or merging would put NaN / inf into a weight (naming
            the module, the adapter and the count); the model is then unchanged.
    """
    active = active_adapters(model)
    names = active if names is None else list(names)
    inactive = [n for n in names if n not in active]
    if inactive:
        raise ValueError(f"only active adapters can be merged; {inactive} are not active ({active})")
    layers = list(lora_layers(model)) + list(param_lora.layers(model))
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("adapters are already merged; unmerge before merging again")
    _check_untied(model, names)
    done: list[tuple[LoraLayer, str]] = []
    try:
        for module_name, layer in layers:
            for n in names:
                if layer.has(n):
                    _merge_finite(layer, n, module_name)
                    done.append((layer, n))
    except Exception:
        for layer, n in reversed(done):
            layer.unmerge_adapter(n)
        raise
    return model


def _merge_finite(layer: LoraLayer, name: str, module_name: str) -> None:
    """layer.merge_adapter(name), undone exactly (from a copy of W) when it leaves W non-finite."""
    if not isinstance(getattr(layer, "weight", None), torch.Tensor):  # param_lora: checked at load only
        layer.merge_adapter(name)
        return
    before = layer.weight.detach().clone()
    layer.merge_adapter(name)
    bad = int((~torch.isfinite(layer.weight.detach())).sum())
    if bad:
        layer.unmerge_adapter(name)
        with torch.no_grad():
            layer.weight.copy_(before)
        was = int((~torch.isfinite(before)).sum())
        raise ValueError(
            f"merging adapter {name!r} into {module_name!r} gives {bad} non-finite (NaN / inf) weight values"
            + (f" (the base weight already has {was})" if was else "")
            + "; nothing was merged. Check the adapter's tensors (or merge in a wider --dtype)"
        )


def _check_untied(model: nn.Module, names: list[str]) -> None:
    # A LoRA delta merged into a weight shared with another module (tied embeddings / output head) would
    # silently change that module too. Trainable tokens are fine: the tied head applies the same rows.
    modules = model_modules(model)
    for module_name, layer in lora_layers(model):
        tied = [n for n, _ in tied_to(model, layer, modules)] if any(n in layer.lora for n in names) else []
        if tied:
            raise RuntimeError(
                f"cannot merge LoRA into {module_name!r}: its weight is tied to {tied}, which would change too; "
                "untie the weights first (e.g. give the output head its own copy) or keep the adapter unmerged"
            )


_merge_active = merge  # `unload`'s `merge` argument shadows the function


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of W (W is restored up to float rounding)."""
    for _, layer in [*lora_layers(model), *param_lora.layers(model)]:
        for n in reversed(list(layer.merged)):
            layer.unmerge_adapter(n)
    return model


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in [*lora_layers(model), *param_lora.layers(model)])


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter and return the plain model with its original parameter names.

    With `merge=True` the active adapters are merged first (a saved-module copy of the active adapter
    replaces the original module); with `merge=False` the base comes back untouched.
    """
    if merge and not is_merged(model):
        _merge_active(model)
    elif not merge:
        unmerge(model)
    for path, layer in list(adapter_layers(model)):
        if isinstance(layer, LoraLayer):
            plain = unwrap(layer)
        elif merge and layer.active:
            plain = layer.lora_copies[layer.active[0]]
        else:
            plain = unwrap_saved(layer)
        replace_module(model, path, plain)
    for _, layer in list(param_lora.layers(model)):
        param_lora.unwrap(layer)  # merged or not, as asked above: the parameters keep their values
    adapter_records(model).clear()
    model.__dict__["lorakit_active"] = []
    model.__dict__.pop("lorakit_slots", None)  # slots.RowSlots: nothing left to serve per row
    link_fused(model)  # no LoRA layer left: the fused groups' hooks come off their parents
    return model
