"""LoRA on parameters: MoE experts stored as fused nn.Parameter tensors (PEFT's `target_parameters`).

transformers v5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ... as 3-D parameters
of one `...Experts` module (`gate_up_proj`, `down_proj`), not as Linear modules, so module targeting
(`all-linear`) cannot reach them. `LoraConfig(target_parameters=["mlp.experts.gate_up_proj", ...])` adds a
rank-r adapter to every expert of such a parameter, in PEFT 0.21's `lora.ParamWrapper` layout and math:

    parameter W: (E, out, in) (`F.linear(x, W[e])`, the default), or (E, in, out) when the module says
    `is_transposed = True` (gpt-oss, `x @ W[e]`); a 2-D parameter is (out, in) with E = 1.
    A: (r·E, in)   B: (out, r·E)   (PEFT's `lora_A` / `lora_B` Linear weights, saved as they are)
    expert e:  A_e = A.view(E, r, in)[e]   B_e = B.view(out, r, E)[:, :, e]   ΔW_e = s · B_e @ A_e
    (transposed layout: ΔW_e is stored as its transpose, (in, out)).

The module keeps its class's forward; the adapted module (`ParamLora<Class>`, the same object with a
subclass) runs it with W + ΔW in place of W for that call only (explicit state: `active`, `merged`,
`disabled`; nothing is cached). The factors sit in `<module>.param_lora.<param>.<adapter>.A / .B`.
Dropout, DoRA and fan_in_fan_out are refused, as PEFT refuses them (dropout cannot be factored out of a
weight delta).

File keys (PEFT nests one ParamWrapper per targeted parameter, in the module's parameter order, the last
outermost): parameter p of module M is `base_model.model.M.<"base_layer." × k>lora_A.weight` where k is the
number of targeted parameters of M registered after p.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from . import functional as LF
from .config import scaling

PREFIX = "base_model.model."


class ParamFactors(nn.Module):
    """One adapter's factors on one parameter: A (r·E, in), B (out, r·E), in PEFT's layout."""

    def __init__(self, A: Tensor, B: Tensor, r: int, experts: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.r, self.experts, self.alpha = r, experts, alpha
        self.scale = scaling(r, alpha, use_rslora)

    def per_expert(self) -> tuple[Tensor, Tensor]:
        """(A_e (E, r, in), B_e (E, out, r)): expert e's factors, as the module docstring defines them."""
        A = self.A.reshape(self.experts, self.r, self.A.shape[-1])
        B = self.B.reshape(self.B.shape[0], self.r, self.experts).permute(2, 0, 1)
        return A, B

    def extra_repr(self) -> str:
        return f"r={self.r}, experts={self.experts}, alpha={self.alpha}, scale={self.scale:g}"


def param_shape(param: Tensor, transposed: bool) -> tuple[int, int, int]:
    """(E, in, out) of a 2-D or 3-D parameter. Raises ValueError for other ranks."""
    if param.ndim == 2:
        return 1, param.shape[1], param.shape[0]
    if param.ndim == 3:
        E, d1, d2 = param.shape
        return (E, d1, d2) if transposed else (E, d2, d1)
    raise ValueError(f"target_parameters: only 2-D and 3-D parameters can carry LoRA, not {param.ndim}-D")


def delta(param: Tensor, f: ParamFactors, transposed: bool) -> Tensor:
    """ΔW in the parameter's own layout: s · B_e @ A_e per expert (functional.delta_weight, batched)."""
    A, B = f.per_expert()
    d = LF.delta_weight(A, B, f.scale)  # (E, out, in)
    if param.ndim == 2:
        return d[0]
    return d.transpose(-2, -1) if transposed else d


def add_delta(W: Tensor, f: ParamFactors, transposed: bool) -> Tensor:
    """W + ΔW in W's dtype: `delta` folded into one baddbmm / addmm (no separate ΔW tensor, as PEFT's
    `_LoraFactorsProxy`); tested equal to W + delta(...)."""
    A, B = (t.to(W.dtype) for t in f.per_expert())
    if W.ndim == 2:
        return torch.addmm(W, B[0], A[0], alpha=f.scale)
    if transposed:  # (E, in, out): ΔW_eᵀ = s · A_eᵀ B_eᵀ
        return torch.baddbmm(W, A.transpose(-2, -1), B.transpose(-2, -1), alpha=f.scale)
    return torch.baddbmm(W, B, A, alpha=f.scale)


class ParamLoraMixin:
    """What an adapted module gains: `param_lora` (param name -> adapter name -> ParamFactors) and state."""

    param_lora: nn.ModuleDict
    active: tuple[str, ...]
    merged: list[str]
    disabled: bool
    base_class: type

    def forward(self, *args, **kwargs):
        live = [n for n in self.active if n not in self.merged] if not self.disabled else []
        swapped = {}
        for pname, by_adapter in self.param_lora.items():
            names = [n for n in live if n in by_adapter]
            if names:
                W = self._parameters[pname]
                for n in names:
                    W = add_delta(W, by_adapter[n], self.is_transposed_layout)
                swapped[pname] = self._parameters[pname]
                self._parameters[pname] = W  # a tensor, not a Parameter, for this call only
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(swapped)

    @property
    def is_transposed_layout(self) -> bool:
        return bool(getattr(self, "is_transposed", False))

    def has(self, name: str) -> bool:
        return any(name in d for d in self.param_lora.values())

    def merge_adapter(self, name: str) -> None:
        """W += ΔW for every parameter adapter `name` adapts here. Raises if merged already or not float."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is already merged")
        with torch.no_grad():
            for pname, by_adapter in self.param_lora.items():
                if name in by_adapter:
                    W = self._parameters[pname]
                    if not W.is_floating_point():
                        raise RuntimeError(f"cannot merge into a {W.dtype} parameter {pname!r}")
                    W.add_(delta(W, by_adapter[name], self.is_transposed_layout).to(W.dtype))
        self.merged.append(name)

    def unmerge_adapter(self, name: str) -> None:
        if name not in self.merged:
            raise RuntimeError(f"adapter {name!r} is not merged")
        with torch.no_grad():
            for pname, by_adapter in self.param_lora.items():
                if name in by_adapter:
                    W = self._parameters[pname]
                    W.sub_(delta(W, by_adapter[name], self.is_transposed_layout).to(W.dtype))
        self.merged.remove(name)


_classes: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _classes:
        _classes[cls] = type(f"ParamLora{cls.__name__}", (ParamLoraMixin, cls), {"__module__": __name__})
    return _classes[cls]


def wrap(module: nn.Module) -> ParamLoraMixin:
    """Make `module` (in place: the same object, its class's forward) able to carry parameter adapters."""
    if isinstance(module, ParamLoraMixin):
        return module
    base = type(module)
    module.__class__ = _adapted_class(base)
    module.base_class = base
    module.param_lora = nn.ModuleDict()
    module.active, module.merged, module.disabled = (), [], False
    return module


def unwrap(module: ParamLoraMixin) -> nn.Module:
    """The plain module again (in place), its parameters untouched."""
    del module._modules["param_lora"]
    for attr in ("active", "merged", "disabled"):
        module.__dict__.pop(attr, None)
    module.__class__ = module.__dict__.pop("base_class")
    return module


# -- on a model --------------------------------------------------------------------------------------------------


def layers(model: nn.Module) -> Iterator[tuple[str, ParamLoraMixin]]:
    for name, module in model.named_modules():
        if isinstance(module, ParamLoraMixin):
            yield name, module


def matches(specs: list[str], full_name: str) -> bool:
    """PEFT's rule: the full parameter name equals an entry or ends with "." + entry."""
    return any(full_name == s or full_name.endswith("." + s) for s in specs)


def find_param_targets(model: nn.Module, specs: list[str]) -> list[str]:
    """Full names ("<module>.<param>") of the parameters `specs` selects, in model order.

    Raises:
        ValueError: an entry matches no parameter (naming the nearest fused parameters), or a match is a
            parameter of the top-level model, a LoRA tensor, or not 2-D / 3-D.
    """
    found = []
    for module_name, module in model.named_modules():
        if ".param_lora" in f".{module_name}" or ".lora." in f".{module_name}.":
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if matches(specs, full):
                if not module_name:
                    raise ValueError(
                        f"target_parameters: {full!r} is on the top-level model; it cannot be wrapped"
                    )
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"target_parameters: {full!r} is {p.ndim}-D; only 2-D and 3-D are supported"
                    )
                found.append(full)
    for s in specs:
        if not any(matches([s], f) for f in found):
            fused = sorted({_generic(n) for n, _ in fused_parameters(model)})
            raise ValueError(
                f"target_parameters entry {s!r} matches no parameter of the model; fused expert parameters: "
                f"{', '.join(fused[:8]) or 'none'}"
            )
    return found


def fused_parameters(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """3-D parameters held directly by a module (fused MoE experts), which module targeting cannot adapt."""
    out = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 3 and not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                out.append((f"{module_name}.{pname}" if module_name else pname, tuple(p.shape)))
    return out


def _generic(name: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` -> `mlp.experts.down_proj` (the suffix after the layer index)."""
    m = re.match(r".*?\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def skipped_summary(model: nn.Module, adapted: list[str], param_targets: list[str]) -> str:
    """What `all-linear` left out: "" when no fused parameter is untargeted, else one line naming them."""
    left = [(n, s) for n, s in fused_parameters(model) if n not in param_targets]
    if not left:
        return ""
    kinds = sorted({_generic(n) for n, _ in left})
    example, shape = left[0]
    return (
        f"all-linear adapted {len(adapted)} Linear modules and skipped {len(left)} fused expert parameters "
        f"(nn.Parameter tensors, not Linear modules), e.g. {example} {shape}; to adapt them add "
        f"target_parameters={kinds} (LoraConfig) / --target-parameters {','.join(kinds)}"
    )


def add(model: nn.Module, name: str, full_names: list[str], config) -> None:
    """Adapter `name` on each parameter of `full_names` (A as PEFT initialises lora_A, B = 0; init "zeros":
    both 0). Raises ValueError for options PEFT's ParamWrapper refuses."""
    if not full_names:
        return
    if config.dropout:
        raise ValueError(
            "target_parameters: LoRA dropout must be 0 (it cannot be factored out of a weight delta)"
        )
    if config.use_dora or config.fan_in_fan_out:
        raise ValueError("target_parameters: use_dora and fan_in_fan_out are not supported (as in PEFT)")
    for full in full_names:
        module_name, _, pname = full.rpartition(".")
        module = wrap(model.get_submodule(module_name))
        W = module._parameters[pname]
        E, fan_in, fan_out = param_shape(W, module.is_transposed_layout)
        r, alpha = config.rank_for(full), config.alpha_for(full)
        dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(r * E, fan_in, dtype=dtype, device=W.device)
        if config.init == "zeros":
            nn.init.zeros_(A)
        elif config.init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(fan_out, r * E, dtype=dtype, device=W.device)
        by_adapter = module.param_lora[pname] if pname in module.param_lora else nn.ModuleDict()
        by_adapter[name] = ParamFactors(A, B, r, E, alpha, config.use_rslora)
        module.param_lora[pname] = by_adapter


def remove(model: nn.Module, name: str) -> None:
    """Delete adapter `name` from every parameter; modules left without adapters become plain again."""
    for _, module in list(layers(model)):
        if name in module.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for pname in list(module.param_lora):
            if name in module.param_lora[pname]:
                del module.param_lora[pname][name]
            if not len(module.param_lora[pname]):
                del module.param_lora[pname]
        module.active = tuple(n for n in module.active if n != name)
        if not len(module.param_lora):
            unwrap(module)


def set_active(model: nn.Module, names: list[str]) -> None:
    """`names` active (deltas add) and trainable; every other parameter adapter frozen."""
    for _, module in layers(model):
        module.active = tuple(n for n in names if module.has(n))
        for by_adapter in module.param_lora.values():
            for n, f in by_adapter.items():
                f.requires_grad_(n in names)


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for _, module in layers(model):
        yield from module.param_lora.parameters()


def file_key(model: nn.Module, full: str, kind: str, full_names: list[str]) -> str:
    """PEFT's file key of factor `kind` ("A" or "B") of parameter `full`, one of the parameters `full_names`
    an adapter targets (the nesting depth counts the targeted parameters of the same module registered
    after it; see the module docstring)."""
    module_name, _, pname = full.rpartition(".")
    module = model.get_submodule(module_name)
    order = [n for n, _ in module.named_parameters(recurse=False) if f"{module_name}.{n}" in full_names]
    depth = len(order) - 1 - order.index(pname)
    return f"{PREFIX}{module_name}.{'base_layer.' * depth}lora_{kind}.weight"


def file_tensors(model: nn.Module, name: str, full_names: list[str]) -> dict[str, Tensor]:
    """Adapter `name`'s factors by PEFT file key."""
    out = {}
    for full in full_names:
        module_name, _, pname = full.rpartition(".")
        f = model.get_submodule(module_name).param_lora[pname][name]
        out[file_key(model, full, "A", full_names)] = f.A.detach()
        out[file_key(model, full, "B", full_names)] = f.B.detach()
    return out


def split_file_tensors(
    model: nn.Module, config, tensors: dict[str, Tensor]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], str]:
    """({full param name: {"A", "B"}}, the other tensors, "" or what is wrong) for a file whose config says
    `config.target_parameters`: every selected parameter needs both factors, in the shapes its rank gives."""
    if not config.target_parameters:
        return {}, tensors, ""
    try:
        full_names = find_param_targets(model, config.target_parameters)
    except ValueError as err:
        return {}, tensors, str(err)
    found: dict[str, dict[str, Tensor]] = {}
    rest = dict(tensors)
    for full in full_names:
        module_name, _, pname = full.rpartition(".")
        module = model.get_submodule(module_name)
        W = module._parameters[pname]
        E, fan_in, fan_out = param_shape(W, bool(getattr(module, "is_transposed", False)))
        r = config.rank_for(full)
        want = {"A": (r * E, fan_in), "B": (fan_out, r * E)}
        for kind, shape in want.items():
            k = file_key(model, full, kind, full_names)
            if k not in rest:
                return {}, tensors, f"missing key {k!r} for target parameter {full!r}"
            if tuple(rest[k].shape) != shape:
                return (
                    {},
                    tensors,
                    (
                        f"parameter {full!r}: {k!r} has shape {tuple(rest[k].shape)}, expected {shape} "
                        f"(rank {r} x {E} experts)"
                    ),
                )
            found.setdefault(full, {})[kind] = rest.pop(k)
    return found, rest, ""


def copy_in(model: nn.Module, name: str, found: dict[str, dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for full, t in found.items():
            module_name, _, pname = full.rpartition(".")
            f = model.get_submodule(module_name).param_lora[pname][name]
            f.A.copy_(t["A"])
            f.B.copy_(t["B"])
