"""save_adapter: one named adapter of a model as a PEFT adapter directory."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from .. import functional as LF
from .. import param_lora
from ..adapters import Adapter, get_adapter
from ..config import LoraConfig
from ..inject import compact_targets, model_modules
from ..layers import LoraWeights
from . import keys
from .base_ref import consumer_fields
from .files import write_adapter

FINGERPRINT_KEY = "lorakit.fingerprint"
VERSION_KEY = "lorakit.version"


def save_adapter(
    model: nn.Module,
    dir: str | os.PathLike,
    name: str = "default",
    dtype: torch.dtype | None = None,
    *,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write adapter `name` of `model` in PEFT's format: `dir` for "default", else `dir/<name>/` (PEFT's rule).

    The directory holds `adapter_config.json` and `adapter_model.safetensors` (keys with the
    `base_model.model.` prefix, adapter name stripped), loadable by `load_adapter` and by PEFT's
    `PeftModel.from_pretrained`. A PiSSA adapter is saved converted to a plain rank-2r LoRA that works on the
    untouched base. The safetensors metadata carries the base fingerprint (`lorakit.fingerprint`). The write
    is all-or-nothing (io.files.write_adapter): killed at any instant, the directory holds the complete old
    adapter or the complete new one.

    Args:
        dtype: cast the adapter tensors to this dtype (default: as they are, usually fp32).
        extra: writes more files into the same all-or-nothing save (called with the staging folder).
    Returns:
        The directory written.
    Raises:
        KeyError: no adapter `name` on the model.
    """
    adapter = get_adapter(model, name)
    config = adapter.config
    tensors, pissa = _file_tensors(model, adapter, name)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    if pissa:
        config = _pissa_as_lora(config)
    conv1d = any(_is_conv1d(model.get_submodule(n)) for n in adapter.lora_modules)
    peft = config.to_peft_dict(
        target_modules=compact_targets(model, adapter.lora_modules) if adapter.lora_modules else None
    )
    # PEFT reads fan_in_fan_out as "the targets store W as (in, out)": true exactly for GPT-2's Conv1D.
    peft["fan_in_fan_out"] = conv1d
    # task_type / base_model_name_or_path as AutoPeftModel, vLLM and TGI need them (io/base_ref.py).
    peft.update(consumer_fields(model, config.base_model_name_or_path))
    if adapter.tied_modules:
        # The output head follows the saved embedding copy (tied); PEFT does the same with this flag.
        peft["ensure_weight_tying"] = True
    from .. import __version__

    metadata = {VERSION_KEY: __version__}
    if adapter.fingerprint:
        metadata[FINGERPRINT_KEY] = adapter.fingerprint
    root = Path(dir)
    return write_adapter(root if name == "default" else root / name, peft, tensors, metadata, extra=extra)


def _file_tensors(model: nn.Module, adapter: Adapter, name: str) -> tuple[dict[str, Tensor], bool]:
    """Every tensor adapter `name` saves, by its PEFT key; and whether a PiSSA adapter was converted."""
    tensors: dict[str, Tensor] = {}
    pissa = False
    for module_name in adapter.lora_modules:
        layer = model.get_submodule(module_name)
        w: LoraWeights = layer.lora[name]
        found = {kind: t.detach() for kind, t in w.variant.tensors(w).items()}
        if w.pissa_init is not None:
            # ΔW - ΔW₀ = s·(B A - B₀ A₀) = s·[B, -B₀] [A; A₀]: a plain rank-2r LoRA on the untouched base.
            A0, B0 = w.pissa_init
            A, B = found["A"], found["B"]
            found["A"], found["B"] = LF.concat_factors([(A, B, 1.0), (A0.to(A.dtype), B0.to(B.dtype), -1.0)])
            pissa = True
        for kind, t in found.items():
            tensors[keys.key(module_name, kind, layer)] = t
    written: set[int] = set()
    # Embeddings first: a tied output head shares the embedding's TokenWeights; PEFT saves them once, on
    # the embedding. An untied head has its own rows and saves them under its own name.
    token_layers = [(n, model.get_submodule(n)) for n in adapter.token_modules]
    for module_name, layer in sorted(token_layers, key=lambda x: not isinstance(x[1], nn.Embedding)):
        t = layer.tokens[name]
        if id(t) not in written:
            tensors[keys.key(module_name, "tokens")] = t.values.detach()
            written.add(id(t))
    for module_name in adapter.saved_modules:
        copy = model.get_submodule(module_name).lora_copies[name]
        for k, v in copy.state_dict().items():
            tensors[f"{keys.PREFIX}{module_name}.{k}"] = v.detach()
    for module_name in adapter.tied_modules:
        # PEFT (ensure_weight_tying) expects the tied head's copy too; same values, its own storage.
        copy = model.get_submodule(module_name).lora_copies[name]
        for k, v in copy.state_dict().items():
            tensors[f"{keys.PREFIX}{module_name}.{k}"] = v.detach().clone()
    tensors.update(_biases(model, adapter))
    tensors.update(param_lora.file_tensors(model, name, adapter.param_targets))
    return tensors, pissa


def _biases(model: nn.Module, adapter: Adapter) -> dict[str, Tensor]:
    """The biases PEFT saves with bias="lora_only" (of the LoRA targets) or "all" (every bias)."""
    mode = adapter.config.bias
    if mode == "none":
        return {}
    out = {}
    targets = set(adapter.lora_modules)
    for module_name, module in model_modules(model):
        bias = module._parameters.get("bias")
        if bias is None or not module_name:
            continue
        if module_name in targets:
            out[keys.key(module_name, "bias")] = bias.detach()
        elif mode == "all" and not hasattr(module, "lora_copies"):
            out[f"{keys.PREFIX}{module_name}.bias"] = bias.detach()
    return out


def _pissa_as_lora(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA adapter saved as rank-2r LoRA: every rank doubled, alphas scaled so that the
    scaling s = alpha / r (or alpha / sqrt(r)) of every module is unchanged."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r,
        alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init="default",
    )


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)  # LoraConv1D is a Conv1D too
