"""The tensors one adapter keeps on one layer: LoRA factors (`LoraWeights`) and trainable rows (`TokenWeights`).

Plain records (nn.Modules so that their Parameters register under `<layer>.lora.<name>.*` /
`<layer>.tokens.<name>.*`); what they mean is the variant's (variants.py) and the layer's (layers.py) business.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .config import scaling
from .variants import LoraVariant, variant_for


class LoraWeights(nn.Module):
    """One adapter's tensors on one layer, and the variant (variants.py) that gives them meaning.

    Shapes (out/in of the base layer's math, whatever its storage):
        Linear / Conv1D:  A (r, in), B (out, r), magnitude (out,) with DoRA
        Embedding:        A (r, num_embeddings), B (dim, r)
        Conv2d:           A (r, in, kh, kw), B (out, r, 1, 1)
    """

    def __init__(
        self, A: Tensor, B: Tensor, alpha: float, use_rslora: bool, dropout: float,
        variant: LoraVariant | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.magnitude: nn.Parameter | None = None  # DoRA's (variants.DoraVariant.create)
        self.variant = variant or variant_for(False)
        self.r = A.shape[0]
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = scaling(self.r, alpha, use_rslora)
        self.dropout = dropout
        self.merged_norm: Tensor | None = None  # DoRA: ||W + ΔW|| at merge time, to unmerge exactly
        # PiSSA: the initial (A₀, B₀); saving as plain LoRA needs ΔW - ΔW₀ (io.save)
        self.pissa_init: tuple[Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        kind = "" if self.variant.kind == "lora" else f", {self.variant.kind}"
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}{kind}"


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
        # While merged: the base rows the values replaced (a tied head shares this object: written once).
        self.saved_rows: Tensor | None = None
