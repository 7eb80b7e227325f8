"""load_adapter: a PEFT adapter directory onto a model, validated in full before the model is touched."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from .. import param_lora
from ..adapters import (
    Adapter,
    _check_name,
    _token_plan,
    active_adapters,
    adapter_records,
    add_adapter,
    base_fingerprint,
    delete_adapter,
    get_adapter,
    lora_layers,
    set_adapter,
)
from ..config import LoraConfig
from ..inject import find_modules, find_targets, model_modules
from . import keys
from .files import CONFIG_NAME, AdapterFileError, AdapterFiles, adapter_dir, read_adapter
from .save import FINGERPRINT_KEY


@dataclass
class _Plan:
    """Every tensor of the file, assigned to the module and slot it goes to (validated)."""

    lora: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {"A", "B", "magnitude"}
    tokens: dict[str, tuple[list[int], Tensor]] = field(default_factory=dict)
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> its state dict
    biases: dict[str, Tensor] = field(default_factory=dict)
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    params: dict[str, dict[str, Tensor]] = field(
        default_factory=dict
    )  # param_lora: "<module>.<param>" -> A, B


def load_adapter(
    model: nn.Module,
    dir: str | os.PathLike,
    name: str = "default",
    activate: bool | None = None,
    ignore_fingerprint: bool = False,
) -> Adapter:
    """Load a PEFT-format adapter directory onto `model` as adapter `name`; all or nothing.

    `dir` is the adapter directory itself or, for a name other than "default", a root holding `dir/<name>/`
    (where `save_adapter` and PEFT put it). Only safetensors are read; `adapter_model.bin` is refused.
    Everything is validated before the model is touched: the config, every tensor key (unknown, missing,
    unexpected), the modules they name, shapes (against the module and its rank in `rank_pattern`), dtypes
    and the base-model fingerprint. Adapter tensors keep the file's values exactly (cast only to the adapter
    dtype: fp32 over half-precision bases, as created by `add_adapter`).

    Args:
        activate: True: make it the only active adapter; False: leave it inactive; None: activate it only
            when no adapter is active.
        ignore_fingerprint: load even when the file says it was trained on other base weights.
    Returns:
        The new Adapter record.
    Raises:
        AdapterFileError: anything wrong with the files or their fit to the model (naming the file and the
            module). ValueError: `name` invalid or in use. RuntimeError: adapters are merged.
        On any error the model is unchanged.
    """
    _check_name(name)
    if name in adapter_records(model):
        raise ValueError(
            f"adapter {name!r} already exists on this model; delete it or load under another name"
        )
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("cannot load an adapter while adapters are merged; unmerge first")
    files = read_adapter(adapter_dir(dir, name))
    config_file = files.path / CONFIG_NAME
    try:
        config = LoraConfig.from_peft_dict(files.config, source=str(config_file))
    except (ValueError, TypeError, AttributeError) as err:  # wrong JSON types surface as any of these
        raise AdapterFileError(
            f"{config_file}: invalid config ({err})" if str(config_file) not in str(err) else str(err)
        ) from err
    plan = _validate(model, files, config)
    if not ignore_fingerprint:
        _check_fingerprint(model, files, plan)
    return _inject(model, name, config, plan, activate)


def _validate(model: nn.Module, files: AdapterFiles, config: LoraConfig) -> _Plan:
    weights = files.weights_path
    config_file = files.path / CONFIG_NAME

    def fail(msg: str) -> AdapterFileError:
        return AdapterFileError(f"{weights}: {msg}")

    modules = dict(model_modules(model))
    for k, t in files.tensors.items():
        if not t.is_floating_point():
            raise fail(f"tensor {k!r} has dtype {t.dtype}; adapter tensors must be floating point")
    try:
        saved_names = _saved_modules(model, config.modules_to_save or [])
        token_plan = _token_plan(model, config)
    except ValueError as err:
        raise AdapterFileError(f"{config_file}: {err}") from err

    # Output heads tied to a saved embedding follow its copy; PEFT (ensure_weight_tying) also writes them.
    tied_heads = _tied_heads(model, saved_names)
    tied_found: dict[str, dict[str, Tensor]] = {}
    plan = _Plan()
    plan.params, tensors, why = param_lora.split_file_tensors(model, config, files.tensors)
    if why:
        raise fail(why)
    for k, t in tensors.items():
        parsed = keys.parse(k)
        if parsed is not None and parsed[0] not in modules:
            raise fail(f"key {k!r} names module {parsed[0]!r}, which this model does not have")
        if parsed is not None and parsed[1] in ("A", "B", "magnitude"):
            plan.lora.setdefault(parsed[0], {})[parsed[1]] = t
        elif parsed is not None and parsed[1] == "tokens":
            if parsed[0] not in token_plan:
                raise fail(f"unexpected key {k!r}: trainable_token_indices does not name {parsed[0]!r}")
            plan.tokens[parsed[0]] = (token_plan[parsed[0]], t)
        elif parsed is not None and parsed[1] == "lora_bias":
            raise fail(f"key {k!r}: LoRA biases (lora_bias=True) are not supported")
        elif parsed is not None and parsed[1] == "bias" and config.bias != "none":
            plan.biases[parsed[0]] = t
        elif parsed is not None and parsed[1] == "base_weight":
            plan.base_weights[parsed[0]] = t
        else:
            owner = _saved_owner(k, saved_names)
            tied_owner = _saved_owner(k, list(tied_heads))
            module = k[len(keys.PREFIX) : -len(".bias")] if k.startswith(keys.PREFIX) else None
            if owner is not None:
                plan.saved.setdefault(owner, {})[k[len(keys.PREFIX) + len(owner) + 1 :]] = t
            elif tied_owner is not None:
                tied_found.setdefault(tied_owner, {})[k[len(keys.PREFIX) + len(tied_owner) + 1 :]] = t
            elif config.bias == "all" and k.endswith(".bias") and module in modules:
                plan.biases[module] = t
            else:
                raise fail(
                    f"unexpected key {k!r}: not a LoRA, trainable-token, modules_to_save or bias tensor"
                )

    # LoRA: the modules with tensors must be exactly the ones the config targets, each complete and in shape.
    try:
        expected = find_targets(model, config) if config.targets else []
    except ValueError as err:
        raise AdapterFileError(f"{config_file}: {err}") from err
    missing = [n for n in expected if n not in plan.lora]
    if missing:
        raise fail(f"no LoRA tensors for modules {missing} that target_modules in {CONFIG_NAME} selects")
    extra = [n for n in plan.lora if n not in expected]
    if extra:
        raise fail(
            f"unexpected LoRA tensors for modules {extra}: target_modules in {CONFIG_NAME} does not select them"
        )
    for n, found in plan.lora.items():
        r = config.rank_for(n)
        try:
            shapes = keys.lora_shapes(modules[n], r)
        except TypeError as err:
            raise fail(f"module {n!r}: {err}") from err
        wanted = ["A", "B"] + (["magnitude"] if config.use_dora else [])
        if config.use_dora and "magnitude" not in shapes:
            raise fail(f"module {n!r}: DoRA needs a Linear or Conv1D, not a {type(modules[n]).__name__}")
        for kind in wanted:
            if kind not in found:
                raise fail(f"missing key {keys.key(n, kind, modules[n])!r} for module {n!r}")
        for kind, t in found.items():
            if kind not in wanted:
                raise fail(
                    f"unexpected key {keys.key(n, kind, modules[n])!r}: use_dora is false in {CONFIG_NAME}"
                )
            if tuple(t.shape) != shapes[kind]:
                raise fail(
                    f"module {n!r}: {keys.key(n, kind, modules[n])!r} has shape {tuple(t.shape)}, expected "
                    f"{shapes[kind]} (rank {r} on a {type(modules[n]).__name__})"
                )

    for n, ids in token_plan.items():
        if n not in plan.tokens:
            raise fail(f"missing key {keys.key(n, 'tokens')!r} for trainable tokens of module {n!r}")
        emb = modules[n]
        # An Embedding's rows are (num, dim); an untied output Linear's rows are (out, in).
        rows, dim = (
            (emb.num_embeddings, emb.embedding_dim)
            if isinstance(emb, nn.Embedding)
            else (emb.out_features, emb.in_features)
        )
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise AdapterFileError(
                f"{config_file}: trainable_token_indices {bad} are outside {n!r} (0..{rows - 1})"
            )
        shape = tuple(plan.tokens[n][1].shape)
        if shape != (len(ids), dim):
            raise fail(f"module {n!r}: trainable tokens have shape {shape}, expected {(len(ids), dim)}")

    for n in saved_names:
        base = _own_state(modules[n])
        found = plan.saved.get(n, {})
        if sorted(found) != sorted(base):
            lost = sorted(set(base) - set(found))
            extra = sorted(set(found) - set(base))
            raise fail(f"modules_to_save {n!r}: missing tensors {lost}, unexpected tensors {extra}")
        for k, t in found.items():
            if t.shape != base[k].shape:
                raise fail(
                    f"modules_to_save {n!r}: {k!r} has shape {tuple(t.shape)}, expected {tuple(base[k].shape)}"
                )

    for head, found in tied_found.items():
        weight = plan.saved.get(tied_heads[head], {}).get("weight")
        extra = sorted(set(found) - {"weight"})
        if extra or weight is None or not torch.equal(found["weight"], weight):
            raise fail(
                f"modules_to_save: {head!r} is tied to {tied_heads[head]!r}, but the file's "
                f"{keys.PREFIX}{head}.weight differs from it (or carries {extra})"
            )

    for n, t in plan.biases.items():
        bias = modules[n]._parameters.get("bias")
        if bias is None or bias.shape != t.shape:
            want = "no bias" if bias is None else f"shape {tuple(bias.shape)}"
            raise fail(f"module {n!r}: bias of shape {tuple(t.shape)} in the file, the module has {want}")

    for n, t in plan.base_weights.items():
        # PEFT saves an adapted embedding's own weight (save_embedding_layers); it must be the model's.
        w = getattr(modules[n], "weight", None)
        if w is None or w.shape != t.shape or not torch.equal(t.to(w.dtype), w.detach()):
            raise fail(
                f"module {n!r}: the file carries a base weight ({keys.PREFIX}{n}.base_layer.weight) that differs "
                "from the model's; resize / restore the base embedding it was trained with first"
            )
    return plan


def _saved_modules(model: nn.Module, specs: list[str]) -> list[str]:
    """The modules `modules_to_save` names. Entries naming no module are skipped, as PEFT does: its configs
    for a task list every usual head name ("classifier", "score"), and a model has only one of them. A file
    tensor for a module that is not there is still refused (as an unexpected key)."""
    names = {n for n, _ in model_modules(model)}
    present = [s for s in specs if any(n == s or n.endswith("." + s) for n in names)]
    return find_modules(model, present, "modules_to_save") if present else []


def _tied_heads(model: nn.Module, saved_names: list[str]) -> dict[str, str]:
    """{output Linear name: the saved Embedding its weight is tied to} (as adapters._tie_saved_heads)."""
    out = {}
    for n in saved_names:
        emb = model.get_submodule(n)
        if not isinstance(emb, nn.Embedding):
            continue
        for h, m in model_modules(model):
            if h not in saved_names and isinstance(m, nn.Linear) and getattr(m, "weight", None) is emb.weight:
                out[h] = n
    return out


def _saved_owner(k: str, saved_names: list[str]) -> str | None:
    for n in saved_names:
        if k.startswith(f"{keys.PREFIX}{n}."):
            return n
    return None


def _own_state(module: nn.Module) -> dict[str, Tensor]:
    """A module's state dict without lorakit's saved copies (a SavedModule's `lora_copies.*`)."""
    return {k: v for k, v in module.state_dict().items() if not k.startswith("lora_copies.")}


def _token_modules(model: nn.Module, token_plan: dict) -> list[str]:
    """The modules trainable tokens live on: each embedding and any output head tied to it (as _add_tokens)."""
    names = []
    for n in token_plan:
        emb = model.get_submodule(n)
        names.append(n)
        names += [
            h
            for h, m in model_modules(model)
            if h != n and isinstance(m, nn.Linear) and getattr(m, "weight", None) is emb.weight
        ]
    return names


def _check_fingerprint(model: nn.Module, files: AdapterFiles, plan: _Plan) -> None:
    stored = files.metadata.get(FINGERPRINT_KEY)
    if not stored:
        return  # PEFT and other tools write none: nothing to compare
    names = list(plan.lora) + _token_modules(model, {n: ids for n, (ids, _) in plan.tokens.items()})
    current = base_fingerprint(model, names)
    if current and current != stored:  # "": a quantized base, which cannot be compared
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise AdapterFileError(
            f"{files.weights_path}: this adapter was trained on a different base model (the weights of its "
            f"target modules {shown} differ from this model's); pass ignore_fingerprint=True to load it anyway"
        )


def _inject(model: nn.Module, name: str, config: LoraConfig, plan: _Plan, activate: bool | None) -> Adapter:
    was_active = active_adapters(model)
    exact = {
        "targets": "|".join(re.escape(n) for n in plan.lora) or config.targets,
        "exclude": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init": "zeros",  # every value is overwritten from the file
        "modules_to_save": list(plan.saved) or None,
        "trainable_token_indices": {n: ids for n, (ids, _) in plan.tokens.items()} or None,
    }
    old_biases: dict[str, Tensor] = {}
    added = False
    try:
        add_adapter(model, config.replace(**exact), name, activate=False)
        added = True
        with torch.no_grad():
            for n, found in plan.lora.items():
                w = model.get_submodule(n).lora[name]
                w.A.copy_(found["A"])
                w.B.copy_(found["B"])
                if "magnitude" in found:
                    w.magnitude.copy_(found["magnitude"])
            for n, (_, values) in plan.tokens.items():
                model.get_submodule(n).tokens[name].values.copy_(values)
            param_lora.copy_in(model, name, plan.params)
            for n, state in plan.saved.items():
                model.get_submodule(n).lora_copies[name].load_state_dict(state, strict=True)
            for n, t in plan.biases.items():
                bias = model.get_submodule(n).bias
                old_biases[n] = bias.detach().clone()
                bias.copy_(t)
        adapter = get_adapter(model, name)
        adapter.config = config
        if activate or (activate is None and not was_active):
            set_adapter(model, name)
        else:
            set_adapter(model, was_active)  # re-applies trainability: only active adapters train
    except Exception:
        with torch.no_grad():
            for n, old in old_biases.items():
                model.get_submodule(n).bias.copy_(old)
        if added:
            delete_adapter(model, name)
            set_adapter(model, was_active)
        raise
    return adapter
