"""LoRA layers: a base layer that keeps its own parameters (names unchanged) and gains named adapters.

`wrap(module)` turns an nn.Linear / GPT-2 Conv1D / nn.Embedding / nn.Conv2d (or a subclass, e.g. a
quantized Linear) into the matching Lora* layer *without copying anything*: the new object takes over the
module's parameters, buffers and attributes, so `q_proj.weight` stays `q_proj.weight` and tied weights stay
tied. The base forward is the original class's forward (`super().forward`), so a quantized base keeps
working. Adapter tensors sit beside the base ones: `q_proj.lora.<name>.A`, `.B`, `.magnitude`.

What an adapter *does* is its variant's business (variants.py: LoRA, DoRA); a layer supplies only its
shape-specific math (`_lora_branch`, `_lora_add_`, `_delta_weight`) and asks `live_adapters()` which apply.

State is explicit: `active` (adapter names whose delta is added), `merged` (names folded into W),
`disabled`, `fused` (the sibling projections reading the same input, set by adapters.link_fused),
`recompute_input` (training rebuilds the input in backward instead of saving it, fast/recompute.py). Per-row
adapters come from the one mapping of the step (rowstate.current(), set by `per_row_adapters`). Nothing in
forward changes any of it. Which path a call takes (per-row, fast, plain) is layer_paths.py's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from . import functional as LF
from . import rowstate
from .fingerprint import weight_digest
from .layer_paths import FastLinearPath, RowsPath
from .variants import LoraVariant, variant_for
from .weights import LoraWeights, TokenWeights


class LoraLayer(RowsPath):
    """Mixin with the adapter bookkeeping shared by every Lora* layer (its per-row path: layer_paths.py).
    Subclasses implement the math hooks:

    - `_init_weights(r, alpha, use_rslora, dropout, init, dtype) -> LoraWeights`
    - `_lora_branch(w, x) -> Tensor`: what plain LoRA factors w add to the output for input x
    - `_lora_add_(w, y, x)`: the same, no grad, in place into y
    - `_delta_weight(w) -> Tensor`: ΔW in the layout of `self.weight`
    """

    lora: nn.ModuleDict
    tokens: nn.ModuleDict
    active: tuple[str, ...]
    merged: list[str]
    disabled: bool
    fused: object | None
    base_class: type
    base_digest: str

    def _setup_lora(self, base_class: type) -> None:
        self.base_class = base_class
        self.lora = nn.ModuleDict()
        self.tokens = nn.ModuleDict()
        self.active = ()
        self.merged = []
        self.disabled = False
        self.fused = None  # fast.fused.FusedGroup of the sibling projections (adapters.link_fused)
        self.recompute_input = True  # training rebuilds x in backward where recognised (fast/recompute.py)
        self.base_digest = ""  # fingerprint of W before any merge / PiSSA (set by wrap)

    # -- adapters ----------------------------------------------------------------------------------------------

    def add_lora(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, init: str = "default", dtype: torch.dtype | None = None,
        variant: LoraVariant | None = None,
    ) -> LoraWeights:  # fmt: skip
        """Create adapter `name` (not yet active) of `variant` (default: from use_dora).

        Raises ValueError if it exists or the variant does not fit this layer kind."""
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this {type(self).__name__}")
        variant = variant or variant_for(use_dora)
        if variant.linear_only and not isinstance(self, LinearLike):
            raise ValueError(
                f"{variant.kind} is supported on Linear and Conv1D layers, not {self.base_class.__name__}"
            )
        w = self._init_weights(r, alpha, use_rslora, dropout, init, dtype or adapter_dtype(self.weight))
        w.variant = variant
        variant.create(self, w)
        self.lora[name] = w
        return w

    def add_tokens(self, name: str, indices: list[int]) -> TokenWeights:
        raise ValueError(
            f"trainable tokens need an Embedding (or tied output) layer, not {self.base_class.__name__}"
        )

    def _new_tokens(self, name: str, indices: list[int], what: str) -> TokenWeights:
        """Adapter `name`'s trainable rows `indices` of `self.weight` (one row per token), starting as the
        current rows. Raises ValueError if `name` has tokens here already or an index is out of range."""
        if name in self.tokens:
            raise ValueError(f"adapter {name!r} already has trainable tokens on this {what}")
        n_rows = self.weight.shape[0]
        bad = [i for i in indices if not 0 <= i < n_rows]
        if bad:
            raise ValueError(f"trainable token indices {bad} are outside the {what} (0..{n_rows - 1})")
        idx = torch.tensor(indices, device=self.weight.device)
        values = self.weight.detach()[idx].to(adapter_dtype(self.weight)).clone()
        t = TokenWeights(list(indices), values, n_rows)
        self.tokens[name] = t
        return t

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for store in (self.lora, self.tokens):
            if name in store:
                del store[name]
        self.active = tuple(n for n in self.active if n != name)

    def has(self, name: str) -> bool:
        return name in self.lora or name in self.tokens

    def live_adapters(self) -> tuple[str, ...]:
        """The adapters whose delta forward adds here: active, not merged, none while disabled."""
        if self.disabled:
            return ()
        return tuple(n for n in self.active if n not in self.merged and self.has(n))

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = super().forward(x, *args, **kwargs)
        if self.disabled:
            return y
        # Under torch.compile: the plain math only (per-row mappings are an eager, serving-time feature).
        mapping = None if torch.compiler.is_compiling() else rowstate.current()
        if mapping is not None and mapping.covers(self):
            return self._forward_rows(mapping, x, y)
        for name in self.live_adapters():
            if name in self.tokens:
                y = self._apply_tokens(self.tokens[name], x, y)
            if name in self.lora:
                w = self.lora[name]
                y = y + w.variant.branch(self, w, x, y).to(y.dtype)
        return y

    def _apply_tokens(self, t: TokenWeights, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _lora_add_(self, w: LoraWeights, y: Tensor, x: Tensor) -> None:
        y.add_(self._lora_branch(w, x).to(y.dtype))

    # -- merge -------------------------------------------------------------------------------------------------

    def merge_adapter(self, name: str) -> None:
        """Fold adapter `name` into the base weight. Raises if merged already or the base is not float."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is already merged")
        if not self.weight.is_floating_point():
            raise RuntimeError(
                f"cannot merge into a {self.weight.dtype} (quantized?) weight; dequantize the base first"
            )
        with torch.no_grad():
            if name in self.tokens:
                # A tied output head shares weight and TokenWeights with its embedding: write the rows once.
                t = self.tokens[name]
                if t.saved_rows is None:
                    t.saved_rows = self.weight.index_select(0, t.indices).clone()
                    self.weight.index_copy_(0, t.indices, t.values.to(self.weight.dtype))
            if name in self.lora:
                w = self.lora[name]
                w.variant.merge(self, w)
        self.merged.append(name)

    def unmerge_adapter(self, name: str) -> None:
        """Take adapter `name` back out of the base weight (the reverse of `merge_adapter`)."""
        if name not in self.merged:
            raise RuntimeError(f"adapter {name!r} is not merged")
        with torch.no_grad():
            if name in self.lora:
                w = self.lora[name]
                w.variant.unmerge(self, w)
            if name in self.tokens:
                t = self.tokens[name]
                if t.saved_rows is not None:
                    self.weight.index_copy_(0, t.indices, t.saved_rows)
                    t.saved_rows = None
        self.merged.remove(name)

    # Linear-like layers override these to give W as (out, in).
    def _weight_out_in(self) -> Tensor:
        return self.weight

    def _to_out_in(self, delta: Tensor) -> Tensor:
        return delta

    def _set_weight_out_in(self, W: Tensor) -> None:
        self.weight.copy_(W.to(self.weight.dtype))


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in fp32 over half-precision or quantized bases (as PEFT's autocast does)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _init_A(shape: tuple[int, ...], r: int, init: str, dtype, device) -> Tensor:
    A = torch.empty(shape, dtype=dtype, device=device)
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    elif init == "zeros":
        nn.init.zeros_(A)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A


class LinearLike(FastLinearPath, LoraLayer):
    """The math of a Linear-shaped layer: y = base(x) + Σ s · (x Aᵀ) Bᵀ. x (..., in) -> (..., out).

    forward takes a fast path (lorakit.fast) wherever one applies, else the plain path of LoraLayer: the
    choice is layer_paths.FastLinearPath's.
    """

    def _conv1d(self) -> bool:
        return self.base_class is Conv1D

    def _in_out(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _init_weights(self, r, alpha, use_rslora, dropout, init, dtype) -> LoraWeights:
        fan_in, fan_out = self._in_out()
        A = _init_A((r, fan_in), r, init, dtype, self.weight.device)
        B = torch.zeros(fan_out, r, dtype=dtype, device=self.weight.device)
        return LoraWeights(A, B, alpha, use_rslora, dropout)

    def _lora_branch(self, w: LoraWeights, x: Tensor) -> Tensor:
        return LF.lora_linear(x.to(w.A.dtype), w.A, w.B, w.scale, w.dropout, self.training)

    def _lora_add_(self, w: LoraWeights, y: Tensor, x: Tensor) -> None:
        LF.lora_into_(y, x, w.A, w.B, w.scale)

    def _delta_weight(self, w: LoraWeights) -> Tensor:
        return LF.delta_weight(w.A, w.B, w.scale)

    def add_tokens(self, name: str, indices: list[int]) -> TokenWeights:
        """Trainable output rows of an untied head (a tied head shares its embedding's TokenWeights, set
        up by the caller): `values` (n, in) replace rows `indices` of W (out, in), i.e. those logits."""
        if not isinstance(self, nn.Linear):
            raise ValueError(
                f"trainable tokens need an Embedding or a Linear, not a {self.base_class.__name__}"
            )
        if not self.weight.is_floating_point():
            raise ValueError("trainable tokens on a quantized Linear are not supported")
        return self._new_tokens(name, indices, "output head")

    def _apply_tokens(self, t: TokenWeights, x: Tensor, y: Tensor) -> Tensor:
        cols = F.linear(x.to(t.values.dtype), t.values).to(y.dtype)  # (..., n)
        if self.bias is not None:
            cols = cols + self.bias[t.indices]
        return y.index_copy(-1, t.indices, cols)


class LoraLinear(LinearLike, nn.Linear):
    """nn.Linear (or a subclass, e.g. a quantized Linear) with adapters."""


class LoraConv1D(LinearLike, Conv1D):
    """GPT-2's Conv1D (weight stored (in, out), y = x W + b) with adapters; same math as Linear."""

    def _in_out(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    def _delta_weight(self, w: LoraWeights) -> Tensor:
        return LF.delta_weight(w.A, w.B, w.scale).t()

    def _weight_out_in(self) -> Tensor:
        return self.weight.t()

    def _to_out_in(self, delta: Tensor) -> Tensor:
        return delta.t()

    def _set_weight_out_in(self, W: Tensor) -> None:
        self.weight.copy_(W.t().to(self.weight.dtype))


class LoraEmbedding(LoraLayer, nn.Embedding):
    """nn.Embedding with adapters: y = W[ids] + s · Aᵀ[ids] Bᵀ. ids (...) -> (..., dim).

    Default init is A = 0, B ~ N(0, 1) (PEFT's), so the output starts unchanged.
    """

    def _init_weights(self, r, alpha, use_rslora, dropout, init, dtype) -> LoraWeights:
        device = self.weight.device
        A = torch.zeros(r, self.num_embeddings, dtype=dtype, device=device)
        B = torch.empty(self.embedding_dim, r, dtype=dtype, device=device)
        if init == "zeros":
            nn.init.zeros_(B)
        else:
            nn.init.normal_(B)
        return LoraWeights(A, B, alpha, use_rslora, 0.0)

    def _lora_branch(self, w: LoraWeights, x: Tensor) -> Tensor:
        return LF.lora_embedding(x, w.A, w.B, w.scale, self.padding_idx)

    def _delta_weight(self, w: LoraWeights) -> Tensor:
        return LF.delta_weight(w.A, w.B, w.scale).t()  # (num_embeddings, dim)

    def add_tokens(self, name: str, indices: list[int]) -> TokenWeights:
        return self._new_tokens(name, indices, "embedding")

    def _apply_tokens(self, t: TokenWeights, x: Tensor, y: Tensor) -> Tensor:
        pos = t.position[x]
        hit = (pos >= 0).unsqueeze(-1)
        return torch.where(hit, t.values[pos.clamp(min=0)].to(y.dtype), y)


class LoraConv2d(LoraLayer, nn.Conv2d):
    """nn.Conv2d with adapters: A a rank-r conv with the base's kernel / stride / padding, B a 1×1 conv."""

    def _init_weights(self, r, alpha, use_rslora, dropout, init, dtype) -> LoraWeights:
        if self.groups != 1:
            raise ValueError(f"LoRA on grouped Conv2d (groups={self.groups}) is not supported")
        device = self.weight.device
        A = _init_A((r, self.in_channels, *self.kernel_size), r, init, dtype, device)
        B = torch.zeros(self.out_channels, r, 1, 1, dtype=dtype, device=device)
        return LoraWeights(A, B, alpha, use_rslora, dropout)

    def _conv_args(self) -> dict:
        if self.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d with padding_mode={self.padding_mode!r} is not supported")
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def _lora_branch(self, w: LoraWeights, x: Tensor) -> Tensor:
        x = x.to(w.A.dtype)
        return LF.lora_conv2d(x, w.A, w.B, w.scale, self._conv_args(), w.dropout, self.training)

    def _delta_weight(self, w: LoraWeights) -> Tensor:
        return LF.conv_delta_weight(w.A, w.B, w.scale)


# -- wrapping ----------------------------------------------------------------------------------------------------

_LORA_CLASS_FOR = (
    (Conv1D, LoraConv1D),
    (nn.Linear, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv2d, LoraConv2d),
)
_class_cache: dict[type, type] = {}


def lora_class_for(base_class: type) -> type | None:
    """The Lora* class for `base_class` (a subclass gets a cached combined class), or None if unsupported."""
    if base_class in _class_cache:
        return _class_cache[base_class]
    for kind, lora_cls in _LORA_CLASS_FOR:
        if issubclass(base_class, kind):
            if base_class is kind:
                cls = lora_cls
            else:
                cls = type(f"Lora{base_class.__name__}", (lora_cls, base_class), {"__module__": __name__})
            _class_cache[base_class] = cls
            return cls
    return None


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or lora_class_for(type(module)) is not None


def wrap(module: nn.Module) -> LoraLayer:
    """Return a Lora* layer that owns `module`'s parameters, buffers and attributes (no copy).

    Raises:
        TypeError: naming the class when the layer type cannot be adapted.
    """
    if isinstance(module, LoraLayer):
        return module
    cls = lora_class_for(type(module))
    if cls is None:
        raise TypeError(
            f"cannot add LoRA to a {type(module).__name__}: supported are Linear, Embedding, Conv2d and GPT-2 Conv1D"
        )
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    # Own copies of the registries, so adding adapters never touches the original module object.
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._setup_lora(type(module))
    new.base_digest = weight_digest(module.weight)  # taken before any merge or PiSSA changes W
    return new


def unwrap(layer: LoraLayer) -> nn.Module:
    """The plain base module again (its class and parameters), without any adapter state."""
    base = layer.base_class.__new__(layer.base_class)
    state = dict(layer.__dict__)
    for key in (
        "lora",
        "tokens",
        "active",
        "merged",
        "disabled",
        "fused",
        "recompute_input",
        "base_class",
        "base_digest",
    ):
        state.pop(key, None)
    base.__dict__.update(state)
    base._modules = {k: v for k, v in layer._modules.items() if k not in ("lora", "tokens")}
    return base


# modules_to_save copies live in saved.py (which imports nothing of this module); re-exported for existing imports.
from .saved import SavedModule, unwrap_saved, wrap_saved  # noqa: E402, F401
