"""`modules_to_save`: a module each adapter replaces by its own full trainable copy."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import rowstate


class SavedModule:
    """Mixin for `modules_to_save`: each adapter owns a full trainable copy (`lora_copies.<name>`); the
    original module's own parameters keep their names and stay frozen. Forward runs the active copy; under
    `per_row_adapters`, each adapter's copy runs on its own batch rows (the module must map a batch-first
    tensor to a batch-first tensor, as embeddings and heads do)."""

    lora_copies: nn.ModuleDict
    active: tuple[str, ...]
    disabled: bool
    base_class: type

    def forward(self, *args, **kwargs):
        mapping = rowstate.current()
        if not self.disabled and mapping is not None and mapping.covers(self):
            return self._forward_rows(mapping, *args, **kwargs)
        if not self.disabled and self.active:
            return self.lora_copies[self.active[0]](*args, **kwargs)
        return super().forward(*args, **kwargs)

    def _forward_rows(self, mapping, x, *args, **kwargs):
        """The base output, with each adapter's rows replaced by its own copy's output on those rows."""
        y = super().forward(x, *args, **kwargs)
        if args or kwargs or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if any(n in self.lora_copies for n in mapping.groups):
                raise RuntimeError(
                    f"per-row modules_to_save need a {self.base_class.__name__} called with one batch-first "
                    "tensor (an embedding or a head)"
                )
            return y
        for name, rows in mapping.groups.items():
            if name in self.lora_copies:
                y = y.index_copy(0, rows, self.lora_copies[name](x.index_select(0, rows)).to(y.dtype))
        return y

    def add_copy(self, name: str) -> nn.Module:
        if name in self.lora_copies:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        copy = unwrap_saved(self)
        copy = _deepcopy_module(copy)
        for p in copy.parameters():
            p.requires_grad_(True)
        self.lora_copies[name] = copy
        return copy

    def has(self, name: str) -> bool:
        return name in self.lora_copies

    def remove(self, name: str) -> None:
        if name in self.lora_copies:
            del self.lora_copies[name]
        self.active = tuple(n for n in self.active if n != name)


def _deepcopy_module(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


_saved_cache: dict[type, type] = {}


def wrap_saved(module: nn.Module) -> SavedModule:
    """A SavedModule owning `module`'s parameters (no copy); see `wrap`."""
    if isinstance(module, SavedModule):
        return module
    base_class = type(module)
    cls = _saved_cache.get(base_class)
    if cls is None:
        cls = type(f"Saved{base_class.__name__}", (SavedModule, base_class), {"__module__": __name__})
        _saved_cache[base_class] = cls
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new.base_class = base_class
    new.lora_copies = nn.ModuleDict()
    new.active = ()
    new.disabled = False
    return new


def unwrap_saved(layer: SavedModule) -> nn.Module:
    """The original module again (its own class and parameters)."""
    base = layer.base_class.__new__(layer.base_class)
    state = {k: v for k, v in layer.__dict__.items() if k not in ("active", "disabled", "base_class")}
    base.__dict__.update(state)
    base._modules = {k: v for k, v in layer._modules.items() if k != "lora_copies"}
    return base
