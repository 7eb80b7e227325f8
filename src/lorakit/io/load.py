"""load_adapter: a PEFT adapter directory onto a model, validated in full before the model is touched."""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .. import param_lora
from ..adapters import (
    Adapter,
    active_adapters,
    adapter_records,
    add_adapter,
    base_fingerprint,
    check_adapter_name,
    delete_adapter,
    get_adapter,
    lora_layers,
    set_adapter,
)
from ..config import LoraConfig
from ..inject import tied_heads
from .files import CONFIG_NAME, AdapterFileError, AdapterFiles, adapter_dir, read_adapter
from .save import FINGERPRINT_KEY
from .validate import Plan, validate


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
    The same as `load_prepared(model, prepare_adapter(model, dir, name, ignore_fingerprint), name, activate)`.

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
    _check_loadable(model, name)
    return load_prepared(model, prepare_adapter(model, dir, name, ignore_fingerprint), name, activate)


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter validated against one model (`prepare_adapter`), ready to load onto it with `load_prepared`
    as often as needed (a server reloading an evicted adapter) without parsing or checking the file again.

    source: where it was read from. config: its LoraConfig. nbytes: the size of the tensors it holds (CPU
    copies of the file's, which loading copies from and never changes).
    """

    source: Path
    config: LoraConfig
    plan: Plan
    model: weakref.ref  # the model it was validated against
    nbytes: int


def prepare_adapter(
    model: nn.Module,
    source: str | os.PathLike | AdapterFiles,
    name: str = "default",
    ignore_fingerprint: bool = False,
) -> PreparedAdapter:
    """Read and validate an adapter for `model` (as `load_adapter` does) without touching the model.

    source: a directory (found as `load_adapter` finds it for `name`) or the already read AdapterFiles
    (`io.files.adapter_from_bytes`). Raises AdapterFileError as `load_adapter` does.
    """
    files = source if isinstance(source, AdapterFiles) else read_adapter(adapter_dir(source, name))
    config_file = files.path / CONFIG_NAME
    try:
        config = LoraConfig.from_peft_dict(files.config, source=str(config_file))
    except (
        ValueError,
        TypeError,
        AttributeError,
        RecursionError,
    ) as err:  # wrong JSON types surface as these
        raise AdapterFileError(
            f"{config_file}: invalid config ({err})" if str(config_file) not in str(err) else str(err)
        ) from err
    plan = validate(model, files, config)
    if not ignore_fingerprint:
        _check_fingerprint(model, files, plan)
    return PreparedAdapter(files.path, config, plan, weakref.ref(model), files.num_bytes)


def load_prepared(
    model: nn.Module, prepared: PreparedAdapter, name: str = "default", activate: bool | None = None
) -> Adapter:
    """Load an adapter `prepare_adapter` validated for this `model` as adapter `name`; all or nothing.

    Raises:
        ValueError: `name` invalid or in use, or `prepared` was validated against another model.
        RuntimeError: adapters are merged.
    """
    if prepared.model() is not model:
        raise ValueError(f"{prepared.source}: this adapter was prepared for another model; prepare it again")
    _check_loadable(model, name)
    return _inject(model, name, prepared.config, prepared.plan, activate)


def _check_loadable(model: nn.Module, name: str) -> None:
    check_adapter_name(name)
    if name in adapter_records(model):
        raise ValueError(
            f"adapter {name!r} already exists on this model; delete it or load under another name"
        )
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("cannot load an adapter while adapters are merged; unmerge first")


def _token_modules(model: nn.Module, plan: dict) -> list[str]:
    """The modules trainable tokens live on: each embedding and any output head tied to it (as _add_tokens)."""
    names = []
    for n in plan:
        names.append(n)
        names += [h for h, _ in tied_heads(model, n)]
    return names


def _check_fingerprint(model: nn.Module, files: AdapterFiles, plan: Plan) -> None:
    stored = files.metadata.get(FINGERPRINT_KEY)
    if not stored:
        return  # PEFT and other tools write none: nothing to compare
    names = list(plan.lora) + _token_modules(model, {n: ids for n, (ids, _) in plan.tokens.items()})
    current = base_fingerprint(model, names)
    if current and current != stored:  # "": a quantized base, which cannot be compared
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise AdapterFileError(
            f"{files.weights_path}: this adapter was trained on a different base model (the weights of its "
            f"target modules {shown} differ from this model's); pass ignore_fingerprint=True (on the command line: --ignore-fingerprint) to load it anyway"
        )


def _inject(model: nn.Module, name: str, config: LoraConfig, plan: Plan, activate: bool | None) -> Adapter:
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
                for kind, t in w.variant.tensors(w).items():  # A, B and what the variant adds
                    t.copy_(found[kind])
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
