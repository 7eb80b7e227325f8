"""Which modules an adapter targets: PEFT's matching rules, with errors that name what was expected."""

from __future__ import annotations

import difflib
import re

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig
from .layers import LoraLayer, LoraWeights, SavedModule, TokenWeights, is_adaptable
from .param_lora import ParamLoraMixin

# Layer containers whose index `layers_to_transform` refers to (PEFT's COMMON_LAYERS_PATTERN).
LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer")
HEAD_NAMES = ("lm_head", "score", "classifier", "embed_out", "output")


def model_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules() without lorakit's own adapter sub-modules (A/B holders, saved copies).

    One walk that never enters those sub-modules (linear in the model's size: per-row serving calls this for
    every decode step). Same order and names as named_modules(), each module once.
    """
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(name: str, module: nn.Module) -> None:
        if id(module) in seen or isinstance(module, LoraWeights | TokenWeights):
            return
        seen.add(id(module))
        out.append((name, module))
        skip = ("lora", "tokens") if isinstance(module, LoraLayer) else ()
        skip = ("lora_copies",) if isinstance(module, SavedModule) else skip
        skip = ("param_lora",) if isinstance(module, ParamLoraMixin) else skip
        for child_name, child in module._modules.items():
            if child is not None and child_name not in skip:
                walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", model)
    return out


def tied_to(
    model: nn.Module, module: nn.Module, modules: list[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules other than `module` whose weight is `module`'s weight Parameter (an output head tied to
    an input embedding), as (path, module). The one place tied weights are detected: `tied_heads`,
    `head_is_tied`, merging, growing the vocabulary and training's embedding setup all ask this.

    modules: `model_modules(model)` when the caller already has it (a check per layer walks the model once).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter | torch.Tensor):
        return []
    found = model_modules(model) if modules is None else modules
    return [(n, m) for n, m in found if m is not module and getattr(m, "weight", None) is weight]


def tied_heads(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The Linear modules other than `path` whose weight is `path`'s weight (`tied_to`), as (path, module)."""
    return [(n, m) for n, m in tied_to(model, model.get_submodule(path)) if isinstance(m, nn.Linear)]


def head_is_tied(model: nn.Module) -> bool:
    """Whether the model's output head (get_output_embeddings) shares its input embedding's weight."""
    get_head, get_emb = (
        getattr(model, "get_output_embeddings", None),
        getattr(model, "get_input_embeddings", None),
    )
    head = get_head() if callable(get_head) else None
    emb = get_emb() if callable(get_emb) else None
    if head is None or emb is None:
        return False
    return any(m is head for _, m in tied_to(model, emb))


def matches(spec: str | list[str], name: str) -> bool:
    """PEFT's rule: a list entry equals the name or is a dotted suffix; a string is a full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, pattern: str | list[str] | None = None) -> int | None:
    containers = [pattern] if isinstance(pattern, str) else list(pattern or LAYER_CONTAINERS)
    for container in containers:
        m = re.match(rf"(?:.*\.)?{re.escape(container)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def output_head_names(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> set[str]:
    """The output layer(s) that "all-linear" leaves alone: transformers' output embeddings, else a head name."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        return {name for name, m in modules if m is head}
    return {name for name, _ in modules if name.split(".")[-1] in HEAD_NAMES}


def is_linear(module: nn.Module) -> bool:
    if isinstance(module, LoraLayer):
        return issubclass(module.base_class, nn.Linear | Conv1D)
    return isinstance(module, nn.Linear | Conv1D)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` adapts, in model order.

    Raises:
        ValueError: no module matches (with the nearest module names), or a matched module's type cannot
            be adapted (naming the module and its type).
    """
    modules = model_modules(model)
    names = [n for n, _ in modules if n]
    if config.targets == "all-linear":
        heads = output_head_names(model, modules)
        chosen = [(n, m) for n, m in modules if n and is_linear(m) and n not in heads]
    else:
        chosen = [(n, m) for n, m in modules if n and matches(config.targets, n)]
    if config.exclude:
        chosen = [(n, m) for n, m in chosen if not matches(config.exclude, n)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [(n, m) for n, m in chosen if layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        raise ValueError(
            f"targets {config.targets!r} match no module of the model; {_nearest(config.targets, names)}"
        )
    for name, module in chosen:
        if not is_adaptable(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, which LoRA cannot adapt "
                "(supported: Linear, Embedding, Conv2d, GPT-2 Conv1D); make the targets more specific"
            )
    return [n for n, _ in chosen]


def find_modules(model: nn.Module, specs: list[str], what: str) -> list[str]:
    """Modules named by `specs` (exact or dotted suffix), for modules_to_save. Raises if one matches none."""
    names = [n for n, _ in model_modules(model) if n]
    found = []
    for spec in specs:
        hits = [n for n in names if n == spec or n.endswith("." + spec)]
        if not hits:
            raise ValueError(f"{what} entry {spec!r} matches no module; {_nearest([spec], names)}")
        found += [h for h in hits if h not in found]
    return found


def compact_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """The shortest list form of `chosen` for adapter_config.json: the leaf names when they select exactly
    the same modules (what PEFT writes), else the full names."""
    leaves = sorted({n.split(".")[-1] for n in chosen})
    names = [n for n, m in model_modules(model) if n and is_adaptable(m)]
    if sorted(n for n in names if matches(leaves, n)) == sorted(chosen):
        return leaves
    return sorted(chosen)


def _nearest(targets: str | list[str], names: list[str]) -> str:
    leaves = sorted({n.split(".")[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    near = sorted(
        {c for t in wanted for c in difflib.get_close_matches(t.split(".")[-1], leaves, n=5, cutoff=0.5)}
    )
    shown = near or leaves[:12]
    return f"nearest module names: {', '.join(shown)}"
