"""PEFT's tensor keys: which key holds what, and the shape each must have on a given module.

A key is `base_model.model.<module path>.<suffix>` (PEFT strips the adapter name on save):

| kind        | suffix                                   | shape                                  |
|-------------|------------------------------------------|----------------------------------------|
| A / B       | `lora_A.weight`, `lora_B.weight`         | Linear/Conv1D A (r, in), B (out, r);   |
|             |                                          | Conv2d A (r, in, kh, kw), B (out, r, 1, 1) |
| A / B       | `lora_embedding_A`, `lora_embedding_B`   | Embedding A (r, num), B (dim, r)       |
| magnitude   | `lora_magnitude_vector`                  | (out,)                                 |
| tokens      | `token_adapter.trainable_tokens_delta`   | (n_indices, dim), replacement rows     |
| bias        | `base_layer.bias` (LoRA target) / `bias` | the module's bias                      |
| saved       | `<param>` under a modules_to_save path   | the module's own                       |
| base weight | `base_layer.weight` (an adapted Embedding, PEFT's save_embedding_layers) | the weight  |
"""

from __future__ import annotations

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..layers import LoraLayer

PREFIX = "base_model.model."

# (suffix, kind), longest first where one suffix ends another.
SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_embedding_A", "A"),
    (".lora_embedding_B", "B"),
    (".lora_magnitude_vector.weight", "magnitude"),  # PEFT < 0.12 stored it as a sub-module
    (".lora_magnitude_vector", "magnitude"),
    (".token_adapter.trainable_tokens_delta", "tokens"),
    (".lora_B.bias", "lora_bias"),
    (".base_layer.bias", "bias"),
    (".base_layer.weight", "base_weight"),
)


def key(module: str, kind: str, module_obj: nn.Module | None = None) -> str:
    """The file key of tensor `kind` ("A", "B", "magnitude", "tokens", "bias") of `module`."""
    if kind in ("A", "B"):
        suffix = f"lora_embedding_{kind}" if is_embedding(module_obj) else f"lora_{kind}.weight"
    else:
        suffix = {
            "magnitude": "lora_magnitude_vector",
            "tokens": "token_adapter.trainable_tokens_delta",
            "bias": "base_layer.bias",
        }[kind]
    return f"{PREFIX}{module}.{suffix}"


def parse(file_key: str) -> tuple[str, str] | None:
    """(module path, kind) of a key with a known LoRA suffix; None for other keys (saved modules, biases)."""
    if not file_key.startswith(PREFIX):
        return None
    rest = file_key[len(PREFIX) :]
    for suffix, kind in SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], kind
    return None


def is_embedding(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Embedding)


def lora_shapes(module: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
    """The shapes of A, B and (for Linear-like layers) the DoRA magnitude of a rank-r adapter on `module`.

    Raises:
        TypeError: a module type LoRA cannot adapt.
    """
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape
        return {"A": (r, fan_in), "B": (fan_out, r), "magnitude": (fan_out,)}
    if isinstance(module, nn.Linear):
        return {
            "A": (r, module.in_features),
            "B": (module.out_features, r),
            "magnitude": (module.out_features,),
        }
    if isinstance(module, nn.Embedding):
        return {"A": (r, module.num_embeddings), "B": (module.embedding_dim, r)}
    if isinstance(module, nn.Conv2d):
        return {
            "A": (r, module.in_channels, *module.kernel_size),
            "B": (module.out_channels, r, 1, 1),
        }
    kind = module.base_class.__name__ if isinstance(module, LoraLayer) else type(module).__name__
    raise TypeError(f"a {kind} cannot carry LoRA (supported: Linear, Embedding, Conv2d, GPT-2 Conv1D)")
