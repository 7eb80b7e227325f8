"""Adding, switching, disabling and deleting named adapters on a model.

An adapter is one `Adapter` record (name, config, the modules it touches) plus its tensors on each of those
modules (`LoraWeights`, `TokenWeights`, a saved copy). The records live on the model in `model.lorakit_adapters`;
`model.lorakit_active` lists the active names. Every state change here is explicit and reversible.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from . import param_lora
from .config import LoraConfig
from .fast.fused import CROSS_ATTENTION_NAMES, FUSED_SETS, FusedGroup
from .fingerprint import combine, weight_digest
from .inits import RESIDUAL_INITS, residual_factors
from .inject import find_modules, find_targets, model_modules, tied_heads
from .layers import LinearLike, LoraLayer, lora_class_for, unwrap, wrap
from .saved import SavedModule, unwrap_saved, wrap_saved
from .variants import variant_for


@dataclass
class Adapter:
    """One named adapter: its config and the modules it lives on."""

    name: str
    config: LoraConfig
    lora_modules: list[str] = field(default_factory=list)
    token_modules: list[str] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    tied_modules: list[str] = field(default_factory=list)  # heads sharing a saved embedding's copy
    param_targets: list[str] = field(
        default_factory=list
    )  # "<module>.<param>" (param_lora, target_parameters)
    fingerprint: str = ""

    @property
    def modules(self) -> list[str]:
        return self.lora_modules + self.token_modules + self.saved_modules + self.tied_modules


def adapter_records(model: nn.Module) -> dict[str, Adapter]:
    """The adapters on `model`, by name (an empty dict for a plain model)."""
    return model.__dict__.setdefault("lorakit_adapters", {})


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("lorakit_active", []))


def get_adapter(model: nn.Module, name: str) -> Adapter:
    found = adapter_records(model)
    if name not in found:
        raise KeyError(f"no adapter named {name!r} on this model; adapters: {sorted(found) or 'none'}")
    return found[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | SavedModule]]:
    for name, module in model_modules(model):
        if isinstance(module, LoraLayer | SavedModule):
            yield name, module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at module path `path` (e.g. "model.layers.0.self_attn.q_proj") of `model`."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def check_adapter_name(name: str) -> None:
    """Raise ValueError unless `name` is a valid adapter name (non-empty, no '.' or '/': it becomes a key)."""
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"adapter name {name!r} is invalid: expected a non-empty string without '.' or '/'")


def add_adapter(
    model: nn.Module, config: LoraConfig | None = None, name: str = "default", activate: bool = True
) -> nn.Module:
    """Add a new adapter to `model` in place and return the model. Base parameters are frozen.

    The new adapter becomes the only active one (and trainable) unless `activate=False`.

    Raises:
        ValueError: invalid name, a name in use, targets that match nothing, an unsupported layer type,
            or modules_to_save overlapping the LoRA targets. The model is unchanged on any error.
    """
    config = config or LoraConfig()
    check_adapter_name(name)
    if name in adapter_records(model):
        raise ValueError(f"adapter {name!r} already exists on this model")
    if any(isinstance(m, LoraLayer) and m.merged for _, m in lora_layers(model)):
        raise RuntimeError("cannot add an adapter while adapters are merged; unmerge first")
    targets = find_targets(model, config) if config.targets else []
    params = (
        param_lora.find_param_targets(model, config.target_parameters) if config.target_parameters else []
    )
    if config.targets == "all-linear" and (skipped := param_lora.skipped_summary(model, targets, params)):
        warnings.warn(skipped, stacklevel=2)
    saved = find_modules(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else []
    if set(saved) & set(targets):
        raise ValueError(
            f"modules {sorted(set(saved) & set(targets))} are both LoRA targets and modules_to_save"
        )
    tokens = token_plan(model, config)
    _check_fits(model, targets, saved, config)

    adapter = Adapter(name, config)
    try:
        for n in targets:
            _add_lora(model, n, name, config)
            adapter.lora_modules.append(n)
        for n, indices in tokens.items():
            adapter.token_modules += _add_tokens(model, n, name, indices)
        for n in saved:
            layer = wrap_saved(model.get_submodule(n))  # _check_fits: not a LoRA layer
            replace_module(model, n, layer)
            layer.add_copy(name)
            adapter.saved_modules.append(n)
            adapter.tied_modules += _tie_saved_heads(model, n, name, saved)
        param_lora.add(model, name, params, config)
        adapter.param_targets = params
    except Exception:
        _remove_from_layers(model, name)
        _layers_changed(model)
        raise
    adapter.fingerprint = base_fingerprint(model, adapter.lora_modules + adapter.token_modules)
    adapter_records(model)[name] = adapter
    _layers_changed(model)
    _freeze_base(model)
    if activate:
        set_adapter(model, name)
    else:
        set_adapter(model, active_adapters(model))  # re-applied so the new, inactive adapter stays frozen
    return model


def _check_fits(model: nn.Module, targets: list[str], saved: list[str], config: LoraConfig) -> None:
    """Raise ValueError (model untouched) for a variant or init that needs Linear / Conv1D on another layer
    kind, or a modules_to_save entry that is already a LoRA layer."""
    linear_only = variant_for(config.use_dora).linear_only
    for path in targets if linear_only or config.init in RESIDUAL_INITS else []:
        module = model.get_submodule(path)
        cls = type(module) if isinstance(module, LoraLayer) else lora_class_for(type(module))
        if not issubclass(cls, LinearLike):
            what = "use_dora" if config.use_dora else f"init={config.init!r}"
            raise ValueError(
                f"{what}: module {path!r} is a {type(module).__name__}; it needs Linear or Conv1D"
            )
    for path in saved:
        if isinstance(model.get_submodule(path), LoraLayer):
            raise ValueError(f"module {path!r} cannot be both a LoRA target and in modules_to_save")


def _add_lora(model: nn.Module, module_path: str, name: str, config: LoraConfig) -> None:
    layer = wrap(model.get_submodule(module_path))
    replace_module(model, module_path, layer)
    r, alpha = config.rank_for(module_path), config.alpha_for(module_path)
    variant = variant_for(config.use_dora)
    w = layer.add_lora(name, r, alpha, config.dropout, config.use_rslora, init=config.init, variant=variant)
    if config.init in RESIDUAL_INITS:  # pissa, olora, loftq: A, B from W, and W changed (lorakit.inits)
        with torch.no_grad():
            A, B, W_res, keep_init = residual_factors(config.init, layer._weight_out_in(), r, w.scale)
            w.A.copy_(A)
            w.B.copy_(B)
            layer._set_weight_out_in(W_res)
            if keep_init:  # saving as plain LoRA needs ΔW - ΔW₀ (see io.pissa_to_lora)
                w.pissa_init = (A.clone(), B.clone())


def token_plan(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """{module path: trainable row indices} that `config.trainable_token_indices` asks for (a list: the input
    embedding). Raises ValueError for a module that matches nothing or is not an Embedding / untied Linear."""
    spec = config.trainable_token_indices
    if not spec:
        return {}
    if isinstance(spec, dict):
        plan = {}
        for key, ids in spec.items():
            for n in find_modules(model, [key], "trainable_token_indices"):
                plan[n] = list(ids)
    else:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        found = [n for n, m in model_modules(model) if m is emb] if emb is not None else []
        if not found:
            raise ValueError("trainable_token_indices as a list needs a model with get_input_embeddings()")
        plan = {found[0]: list(spec)}
    for n in plan:
        module = model.get_submodule(n)
        # An untied output head (a Linear) takes trainable rows too: new tokens need their logit rows.
        if not isinstance(module, nn.Embedding) and not _is_plain_linear(module):
            raise ValueError(
                f"trainable_token_indices: {n!r} is a {type(module).__name__}, not an Embedding or an "
                "(untied) output Linear"
            )
    return plan


def _is_plain_linear(module: nn.Module) -> bool:
    base = module.base_class if isinstance(module, LoraLayer) else type(module)
    return issubclass(base, nn.Linear)


def _add_tokens(model: nn.Module, module_name: str, name: str, indices: list[int]) -> list[str]:
    layer = wrap(model.get_submodule(module_name))
    replace_module(model, module_name, layer)
    tokens = layer.add_tokens(name, indices)
    names = [module_name]
    if not isinstance(layer, nn.Embedding):
        return names
    # A tied output head reads the same rows: give it the same TokenWeights so its logits follow.
    for n, m in tied_heads(model, module_name):
        head = wrap(m)
        replace_module(model, n, head)
        head.tokens[name] = tokens
        names.append(n)
    return names


def _tie_saved_heads(model: nn.Module, module_name: str, name: str, saved: list[str]) -> list[str]:
    """An output head tied to an Embedding in modules_to_save follows that embedding's trained copy.

    The head becomes a SavedModule whose copy is a Linear sharing the embedding copy's weight Parameter, so
    the pair trains once and stays tied; only the embedding's copy is saved (the head's is the same tensor).
    """
    emb = model.get_submodule(module_name)
    if not isinstance(emb, nn.Embedding):
        return []
    copy = emb.lora_copies[name]
    tied = []
    for n, m in tied_heads(model, module_name):
        if n in saved or isinstance(m, LoraLayer):
            continue
        head = wrap_saved(m)
        replace_module(model, n, head)
        head_copy = head.base_class.__new__(head.base_class)
        skip = ("active", "disabled", "base_class")
        head_copy.__dict__.update({k: v for k, v in head.__dict__.items() if k not in skip})
        head_copy._parameters = {**head._parameters, "weight": copy.weight}
        if head_copy._parameters.get("bias") is not None:
            head_copy._parameters["bias"] = nn.Parameter(head_copy._parameters["bias"].detach().clone())
        head_copy._buffers = dict(head._buffers)
        head_copy._modules = {k: v for k, v in head._modules.items() if k != "lora_copies"}
        head.lora_copies[name] = head_copy
        tied.append(n)
    return tied


def base_fingerprint(model: nn.Module, module_names: Sequence[str]) -> str:
    """Fingerprint of the base weights of `module_names` as they were before any adapter changed them.

    "" (no fingerprint, nothing checked at load) when a weight is quantized: its packed bytes say nothing
    about the float weights the same adapter may later run on.
    """
    digests = {}
    for n in module_names:
        m = model.get_submodule(n)
        if not m.weight.is_floating_point():
            return ""
        digests[n] = m.base_digest if isinstance(m, LoraLayer) else weight_digest(m.weight)
    return combine(digests)


def _freeze_base(model: nn.Module) -> None:
    adapter_params = {id(p) for _, layer in adapter_layers(model) for p in _adapter_params(layer)}
    adapter_params |= {id(p) for p in param_lora.adapter_parameters(model)}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def _adapter_params(layer: nn.Module) -> Iterator[nn.Parameter]:
    if isinstance(layer, LoraLayer):
        yield from layer.lora.parameters()
        yield from layer.tokens.parameters()
    else:
        yield from layer.lora_copies.parameters()


def _remove_from_layers(model: nn.Module, name: str) -> None:
    param_lora.remove(model, name)
    for module_name, layer in list(adapter_layers(model)):
        if not layer.has(name):
            continue
        layer.remove(name)
        empty = not (layer.lora or layer.tokens) if isinstance(layer, LoraLayer) else not layer.lora_copies
        if empty:
            replace_module(
                model, module_name, unwrap(layer) if isinstance(layer, LoraLayer) else unwrap_saved(layer)
            )


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their deltas add up) and the only trainable ones.

    Raises:
        KeyError: an unknown name. RuntimeError: adapters are merged (unmerge first), or two active
            adapters both carry a copy of the same module in modules_to_save.
    """
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        get_adapter(model, n)
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("cannot change the active adapters while adapters are merged; unmerge first")
    for module_name, layer in adapter_layers(model):
        present = tuple(n for n in names if layer.has(n))
        if isinstance(layer, SavedModule) and len(present) > 1:
            raise RuntimeError(f"adapters {list(present)} each have their own copy of {module_name!r}")
        if isinstance(layer, LoraLayer) and len(present) > 1:
            alone = [n for n in present if n in layer.lora and layer.lora[n].variant.exclusive]
            if alone:
                # DoRA rescales the whole weight, so "sum of deltas" has no single meaning next to it.
                kind = layer.lora[alone[0]].variant.kind
                raise RuntimeError(
                    f"{kind} adapter {alone[0]!r} cannot be active with others on {module_name!r}"
                )
        layer.active = present
    for adapter in adapter_records(model).values():
        trainable = adapter.name in names
        for module_name in adapter.modules:
            for p in _params_of(model.get_submodule(module_name), adapter.name):
                p.requires_grad_(trainable)
        if adapter.config.bias != "none":
            _set_bias_trainable(model, adapter, trainable)
    param_lora.set_active(model, names)
    model.__dict__["lorakit_active"] = names


def _params_of(layer: nn.Module, name: str) -> Iterator[nn.Parameter]:
    if isinstance(layer, LoraLayer):
        for d in (layer.lora, layer.tokens):
            if name in d:
                yield from d[name].parameters()
    elif isinstance(layer, SavedModule) and name in layer.lora_copies:
        yield from layer.lora_copies[name].parameters()


def _set_bias_trainable(model: nn.Module, adapter: Adapter, trainable: bool) -> None:
    if adapter.config.bias == "all":
        biases = [p for n, p in model.named_parameters() if n.endswith("bias") and ".lora." not in n]
    else:
        biases = [
            b
            for n in adapter.lora_modules
            if (b := getattr(model.get_submodule(n), "bias", None)) is not None
        ]
    for b in biases:
        b.requires_grad_(trainable)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes exactly its base outputs. Raises RuntimeError if adapters are merged."""
    layers = [layer for _, layer in adapter_layers(model)] + [m for _, m in param_lora.layers(model)]
    if any(getattr(layer, "merged", None) for layer in layers):
        raise RuntimeError("adapters are merged into the weights; unmerge before disabling them")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` entirely; layers left with no adapter become plain modules again."""
    get_adapter(model, name)
    if any(name in layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError(f"adapter {name!r} is merged; unmerge it before deleting it")
    _remove_from_layers(model, name)
    del adapter_records(model)[name]
    model.__dict__["lorakit_active"] = [n for n in active_adapters(model) if n != name]
    _layers_changed(model)


def _layers_changed(model: nn.Module) -> None:
    """After layers were wrapped or unwrapped: relink the fused projections, let attached slots follow."""
    link_fused(model)
    slots = model.__dict__.get("lorakit_slots")  # slots.RowSlots, when per-row serving attached one
    if slots is not None:
        slots.refresh()


def link_fused(model: nn.Module) -> None:
    """Group the sibling projections that read one input (fast/fused.py FUSED_SETS) into FusedGroups, so
    training runs each group as one call of the hand-derived Function. Explicit state, set when layers
    change: the groups made before are unlinked (their hooks on the parent removed), the new ones linked to
    their parent module, whose call opens and closes the group's hand-over (fused.Scope); the model keeps
    them in `lorakit_fused`. A group's members need not all carry adapters (those without one compute
    alone)."""
    for group in model.__dict__.pop("lorakit_fused", ()):
        group.unlink()
    by_parent: dict[str, dict[str, LinearLike]] = {}
    for path, layer in lora_layers(model):
        layer.fused = None
        parent, _, leaf = path.rpartition(".")
        if isinstance(layer, LinearLike) and not any(c in parent for c in CROSS_ATTENTION_NAMES):
            by_parent.setdefault(parent, {})[leaf] = layer
    groups = []
    for parent, siblings in by_parent.items():
        for names in FUSED_SETS:
            members = [siblings[n] for n in names if n in siblings]
            if len(members) > 1 and len({m._in_out()[0] for m in members}) == 1:
                group = FusedGroup(members)
                group.link(model.get_submodule(parent))
                groups.append(group)
                for m in members:
                    m.fused = group
    if groups:
        model.__dict__["lorakit_fused"] = groups


class ParamCount(NamedTuple):
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.4f}"


def trainable_parameters(model: nn.Module) -> ParamCount:
    """(trainable, total) parameter counts, each shared tensor counted once; str() gives a summary line."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # 4-bit packs two values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return ParamCount(trainable, total)
