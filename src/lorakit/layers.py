"""LoRA layers: a base layer that keeps its own parameters (names unchanged) and gains named adapters.

`wrap(module)` turns an nn.Linear / GPT-2 Conv1D / nn.Embedding / nn.Conv2d (or a subclass, e.g. a
quantized Linear) into the matching Lora* layer *without copying anything*: the new object takes over the
module's parameters, buffers and attributes, so `q_proj.weight` stays `q_proj.weight` and tied weights stay
tied. The base forward is the original class's forward (`super().forward`), so a quantized base keeps
working. Adapter tensors sit beside the base ones: `q_proj.lora.<name>.A`, `.B`, `.magnitude`.

State is explicit: `active` (adapter names whose delta is added), `merged` (names folded into W),
`disabled`, `row_plan` (per-row adapters). Nothing in forward changes any of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from . import functional as LF
from .config import scaling
from .fast import linear_forward
from .fast.rows import ROW_STACK_ATTR, forward_rows, row_runs
from .fingerprint import weight_digest


class LoraWeights(nn.Module):
    """One adapter's tensors on one layer.

    Shapes (out/in of the base layer's math, whatever its storage):
        Linear / Conv1D:  A (r, in), B (out, r), magnitude (out,) with DoRA
        Embedding:        A (r, num_embeddings), B (dim, r)
        Conv2d:           A (r, in, kh, kw), B (out, r, 1, 1)
    """

    def __init__(self, A: Tensor, B: Tensor, alpha: float, use_rslora: bool, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.magnitude: nn.Parameter | None = None
        self.r = A.shape[0]
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = scaling(self.r, alpha, use_rslora)
        self.dropout = dropout
        self.merged_norm: Tensor | None = None  # DoRA: ||W + ΔW|| at merge time, to unmerge exactly

    def extra_repr(self) -> str:
        dora = ", dora" if self.magnitude is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}{dora}"


class TokenWeights(nn.Module):
    """Trainable rows of an embedding (e.g. new tokens): `values` (n, dim) replace rows `indices` (n,).

    Stored as replacement values, not deltas, as PEFT's `trainable_tokens_delta` is.
    """

    def __init__(self, indices: list[int], values: Tensor, num_embeddings: int) -> None:
        super().__init__()
        idx = torch.tensor(indices, dtype=torch.long, device=values.device)
        self.register_buffer("indices", idx, persistent=False)
        position = torch.full((num_embeddings,), -1, dtype=torch.long, device=values.device)
        position[idx] = torch.arange(len(indices), device=values.device)
        self.register_buffer("position", position, persistent=False)  # row id -> index in values, or -1
        self.values = nn.Parameter(values)


@dataclass
class RowPlan:
    """Per-row adapters for one forward: for each adapter name, the batch rows (long tensor) it applies to,
    and the same rows as contiguous [start, stop) runs (computed once here, so layers can slice views)."""

    groups: dict[str, Tensor]
    runs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    stacks: dict = field(
        default_factory=dict
    )  # fast.rows: per-layer stacked factors, built inside the context

    def __post_init__(self) -> None:
        for name, rows in self.groups.items():
            if name not in self.runs:
                self.runs[name] = row_runs(rows.tolist())


class LoraLayer:
    """Mixin with the adapter bookkeeping shared by every Lora* layer. Subclasses implement the math hooks:

    - `_init_weights(r, alpha, use_rslora, dropout, init) -> LoraWeights`
    - `_branch(w, x) -> Tensor`: what adapter w adds to the output for input x
    - `_delta_weight(w) -> Tensor`: ΔW in the layout of `self.weight`
    """

    lora: nn.ModuleDict
    tokens: nn.ModuleDict
    active: tuple[str, ...]
    merged: list[str]
    disabled: bool
    row_plan: RowPlan | None
    base_class: type

    def _setup_lora(self, base_class: type) -> None:
        self.base_class = base_class
        self.lora = nn.ModuleDict()
        self.tokens = nn.ModuleDict()
        self.active = ()
        self.merged = []
        self.disabled = False
        self.row_plan = None

    # -- adapters ----------------------------------------------------------------------------------------------

    def add_lora(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, init: str = "default", dtype: torch.dtype | None = None,
    ) -> LoraWeights:  # fmt: skip
        """Create adapter `name` (not yet active). Raises ValueError if it exists or DoRA is unsupported."""
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this {type(self).__name__}")
        dtype = dtype or adapter_dtype(self.weight)
        w = self._init_weights(r, alpha, use_rslora, dropout, init, dtype)
        if use_dora:
            if not isinstance(self, LinearLike):
                raise ValueError(
                    f"DoRA is supported on Linear and Conv1D layers, not {self.base_class.__name__}"
                )
            with torch.no_grad():
                W = self._weight_out_in().to(dtype)
                w.magnitude = nn.Parameter(LF.weight_norm(W, LF.delta_weight(w.A, w.B, w.scale)))
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

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = super().forward(x, *args, **kwargs)
        if self.disabled:
            return y
        if self.row_plan is not None:
            return forward_rows(self, x, y)
        for name in self.active:
            if name in self.merged:
                continue
            if name in self.tokens:
                y = self._apply_tokens(self.tokens[name], x, y)
            if name in self.lora:
                y = y + self._branch(self.lora[name], x, y).to(y.dtype)
        return y

    def _apply_tokens(self, t: TokenWeights, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

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
                if getattr(t, "saved_rows", None) is None:
                    t.saved_rows = self.weight.index_select(0, t.indices).clone()
                    self.weight.index_copy_(0, t.indices, t.values.to(self.weight.dtype))
            if name in self.lora:
                w = self.lora[name]
                delta = self._delta_weight(w)
                if w.magnitude is not None:
                    W = self._weight_out_in().to(delta.dtype)
                    merged, w.merged_norm = LF.dora_merged_weight(W, self._to_out_in(delta), w.magnitude)
                    self._set_weight_out_in(merged)
                else:
                    self.weight.add_(delta.to(self.weight.dtype))
        self.merged.append(name)

    def unmerge_adapter(self, name: str) -> None:
        """Take adapter `name` back out of the base weight (the reverse of `merge_adapter`)."""
        if name not in self.merged:
            raise RuntimeError(f"adapter {name!r} is not merged")
        with torch.no_grad():
            if name in self.lora:
                w = self.lora[name]
                delta = self._delta_weight(w)
                if w.magnitude is not None:
                    W = self._weight_out_in().to(delta.dtype)
                    restored = LF.dora_unmerged_weight(W, self._to_out_in(delta), w.magnitude, w.merged_norm)
                    self._set_weight_out_in(restored)
                    w.merged_norm = None
                else:
                    self.weight.sub_(delta.to(self.weight.dtype))
            if name in self.tokens:
                t = self.tokens[name]
                if getattr(t, "saved_rows", None) is not None:
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


class LinearLike(LoraLayer):
    """The math of a Linear-shaped layer: y = base(x) + Σ s · (x Aᵀ) Bᵀ. x (..., in) -> (..., out).

    forward takes a fast path (lorakit.fast) wherever one applies, else the plain path below.
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = None if args or kwargs else linear_forward(self, x)
        return y if y is not None else super().forward(x, *args, **kwargs)

    def _in_out(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _init_weights(self, r, alpha, use_rslora, dropout, init, dtype) -> LoraWeights:
        fan_in, fan_out = self._in_out()
        A = _init_A((r, fan_in), r, init, dtype, self.weight.device)
        B = torch.zeros(fan_out, r, dtype=dtype, device=self.weight.device)
        return LoraWeights(A, B, alpha, use_rslora, dropout)

    def _branch(self, w: LoraWeights, x: Tensor, y: Tensor | None) -> Tensor:
        x = x.to(w.A.dtype)
        if w.magnitude is None:
            return LF.lora_linear(x, w.A, w.B, w.scale, w.dropout, self.training)
        base_out = None
        if y is not None and not (w.dropout > 0 and self.training):
            base_out = y.to(x.dtype) if self.bias is None else (y - self.bias).to(x.dtype)
        return LF.dora_linear(
            x, self._weight_out_in(), base_out, w.A, w.B, w.magnitude, w.scale, w.dropout, self.training
        )

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

    def _branch(self, w: LoraWeights, x: Tensor, y: Tensor | None) -> Tensor:
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

    def _branch(self, w: LoraWeights, x: Tensor, y: Tensor | None) -> Tensor:
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
        "row_plan",
        "base_class",
        "base_digest",
        ROW_STACK_ATTR,
    ):
        state.pop(key, None)
    base.__dict__.update(state)
    base._modules = {k: v for k, v in layer._modules.items() if k not in ("lora", "tokens")}
    return base


# modules_to_save copies live in saved.py; re-exported here for existing imports.
from .saved import SavedModule, unwrap_saved, wrap_saved  # noqa: E402, F401
