"""The LoRA math, once. Pure functions of tensors: no modules, no state.

Notation, for a frozen weight W of shape (out, in) and an adapter of rank r:
    A: (r, in)        B: (out, r)        s: scaling (alpha / r, or alpha / sqrt(r) with rsLoRA)
    ΔW = s · B @ A                         (out, in)
    lora(x) = s · (dropout(x) @ Aᵀ) @ Bᵀ   x: (..., in) -> (..., out)

Layers, merge, serving and the fast paths call these; every fast path is tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """ΔW = s · B @ A for Linear-shaped factors.

    Args:
        A: (r, in). B: (out, r). scale: s.
    Returns:
        (out, in), in the factors' dtype.
    """
    return (B @ A) * scale


def conv_delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """ΔW for Conv2d factors: A is a conv (r, in/groups, kh, kw), B a 1×1 conv (out, r, 1, 1).

    Returns:
        (out, in/groups, kh, kw): B applied as a matrix over A's flattened kernel.
    """
    out = B.shape[0]
    return (B.flatten(1) @ A.flatten(1)).view(out, *A.shape[1:]) * scale


def lora_linear(
    x: Tensor, A: Tensor, B: Tensor, scale: float, dropout: float = 0.0, training: bool = False
) -> Tensor:
    """The LoRA branch of a Linear: s · (dropout(x) @ Aᵀ) @ Bᵀ.

    Args:
        x: (..., in). A: (r, in). B: (out, r).
        dropout: probability, applied to x on this branch only and only when `training`.
    Returns:
        (..., out). Computing x @ Aᵀ first costs O(r·(in+out)) per token instead of O(in·out).
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, training=True)
    return F.linear(F.linear(x, A), B) * scale


def lora_into_(
    y: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float = 1.0,
    keep: Tensor | None = None,
    u_scale: Tensor | float | None = None,
) -> Tensor:
    """y += s · (D(x) Aᵀ) Bᵀ in place: THE primitive every fast path (training Function, no-grad, per-row runs
    and stacks) is built on, tested against `lora_linear`. One matmul and one addmm_ (as Unsloth's
    `matmul_lora`); the branch is computed in A's dtype and added in y's (fp32 adapters on a bf16 base).

    Args:
        y: (..., out), written in place (a fresh output or a view of one; not a tensor autograd needs).
        x: (..., in), same leading shape as y. A: (r, in). B: (out, r). scale: s.
        keep: optional (N, in) mask multiplied into x (dropout's keep-mask; N = rows of x flattened).
        u_scale: optional factor on the rank-r intermediate u (a scalar 1 / (1 - p), or an (N, r) row mask).
    Returns:
        u = (keep ⊙ x) Aᵀ · u_scale, (N, r) in A's dtype (the training Function saves it for backward).
    """
    u = lora_down(x, A, keep, u_scale)
    lora_up_(y, u, B, scale)
    return u


def lora_down(
    x: Tensor,
    A: Tensor,
    keep: Tensor | None = None,
    u_scale: Tensor | float | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """The first half of `lora_into_`: u = (keep ⊙ x) Aᵀ · u_scale, (N, r) in A's dtype, x (..., in) flattened.

    Shared-input projections (q/k/v) call it once with their A's stacked (R = Σ r) and split u by columns.
    scratch: optional contiguous (N, in) tensor in A's dtype that receives keep ⊙ x (it may be `keep` itself,
    a float 0/1 mask the caller gives up), instead of a fresh N×in tensor: on CPU a fresh large tensor costs
    page faults, up to ~10× the multiply itself.
    """
    x2 = x.reshape(-1, x.shape[-1])
    xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
    if keep is not None:
        xa = xa * keep if scratch is None else torch.mul(xa, keep, out=scratch)
    u = xa @ A.t()
    if u_scale is not None:
        u.mul_(u_scale)
    return u


def lora_up_(y: Tensor, u: Tensor, B: Tensor, scale: float = 1.0) -> None:
    """The second half of `lora_into_`: y += s · u Bᵀ in place. y (..., out), u (N, r), B (out, r)."""
    y2 = y.view(-1, y.shape[-1])
    if y.dtype == B.dtype:
        y2.addmm_(u, B.t(), alpha=scale)
    else:
        y2.add_((u @ B.t()).mul_(scale).to(y.dtype))


def grouped_lora_into_(
    y: Tensor, x: Tensor, A: Tensor, sB: Tensor, index: Tensor | None = None, keep: Tensor | None = None
) -> Tensor:
    """y[index[g·P + p]] += (x[index[g·P + p]] A_gᵀ) (s·B_g)ᵀ for G groups of P rows each, in place: many
    adapters over one batch, each group of rows with its own factors, as two bmm (the same math as
    `lora_into_` per group, tested against it per row).

    Both bmm take the rows as the left operand and the factors as the right one, as stored (A_gᵀ is A_g's
    rows read as columns, s·B_g is (r, out) rows): MKL then streams each factor once at the memory's speed
    (the transposed order, A_g @ xᵀ, ran the down-projection at half that speed: 11.8 vs 5.8 ms a step over
    SmolLM2-135M's 210 layers at 8 slots, 2 threads), and u comes out (G, P·T, r), as the second bmm takes it.

    Args:
        y: (batch, ..., out), written in place. x: (batch, ..., in), same leading shape.
        A: (G, r, in). sB: (G, r, out): the up-projection transposed, its scale folded in.
        index: (G·P,) long, batch rows (repeats allowed: their deltas add up), gathered with one index_select
            and added back with one index_add_; None: the batch is already in place order (group g is rows
            [g·P, (g + 1)·P), P = batch / G): views, nothing gathered or scattered.
        keep: optional (G, P, 1, 1) mask on each place's delta (0: a padding place, adds nothing).
    Returns:
        u (G, P·T, r), T = tokens per row, in A's dtype.
    Raises:
        ValueError: index None and a batch that is not G groups of equal size.
    """
    groups, r = A.shape[0], A.shape[1]
    if index is None and x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} rows is not {groups} groups of equal size")
    width = (x.shape[0] if index is None else index.shape[0]) // groups
    tokens = x.numel() // (x.shape[0] * x.shape[-1])  # (x[0].numel() would be one more op)
    xs = x if index is None else x.index_select(0, index)
    xs = (xs if xs.dtype == A.dtype else xs.to(A.dtype)).reshape(groups, width * tokens, x.shape[-1])
    u = torch.bmm(xs, A.transpose(1, 2))  # (G, P·T, r)
    if keep is not None:
        u.view(groups, width, tokens, r).mul_(keep)
    if index is None and y.dtype == sB.dtype and y.is_contiguous():
        y.view(groups, width * tokens, y.shape[-1]).baddbmm_(u, sB)
        return u
    delta = torch.bmm(u, sB).view(groups * width, *y.shape[1:])
    delta = delta if delta.dtype == y.dtype else delta.to(y.dtype)
    if index is None:
        y.add_(delta)
    else:
        y.index_add_(0, index, delta)
    return u


def lora_embedding(ids: Tensor, A: Tensor, B: Tensor, scale: float, padding_idx: int | None = None) -> Tensor:
    """The LoRA branch of an Embedding: s · (onehot(ids) @ Aᵀ) @ Bᵀ, i.e. rows of Aᵀ looked up, then B.

    Args:
        ids: integer tensor (...). A: (r, num_embeddings). B: (dim, r).
    Returns:
        (..., dim).
    """
    return F.embedding(ids, A.t(), padding_idx=padding_idx) @ B.t() * scale


def lora_conv2d(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    conv_args: dict,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """The LoRA branch of a Conv2d: a rank-r conv with the base's stride / padding, then a 1×1 conv.

    Args:
        x: (N, in, H, W). A: (r, in/groups, kh, kw). B: (out, r, 1, 1).
        conv_args: stride, padding, dilation, groups of the base conv (groups must be 1).
    Returns:
        (N, out, H', W').
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, training=True)
    return F.conv2d(F.conv2d(x, A, **conv_args), B) * scale


def weight_norm(W: Tensor, delta: Tensor) -> Tensor:
    """||W + ΔW|| per output row (DoRA's denominator). W, delta: (out, in) -> (out,)."""
    return torch.linalg.vector_norm(W + delta, dim=1)


def dora_linear(
    x: Tensor,
    W: Tensor,
    base_out: Tensor | None,
    A: Tensor,
    B: Tensor,
    magnitude: Tensor,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """What DoRA adds to the base output: y_dora - y_base, where y_dora = m / ||W + ΔW|| · (W + ΔW) x.

    The norm is detached (treated as a constant in backward), as in the DoRA paper and PEFT.

    Args:
        x: (..., in). W: (out, in), the frozen weight. base_out: x @ Wᵀ without bias, or None to
            recompute it (needed when dropout changes x). A: (r, in). B: (out, r). magnitude m: (out,).
    Returns:
        (..., out), to be added to the base output (which carries the bias).
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, training=True)
        base_out = None
    if base_out is None:
        base_out = F.linear(x, W.to(x.dtype))
    delta = delta_weight(A, B, scale)
    norm = weight_norm(W.to(delta.dtype), delta.detach()).detach()
    ratio = magnitude / norm
    return (ratio - 1) * base_out + ratio * lora_linear(x, A, B, scale)


def dora_ratio(W: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, scale: float) -> Tensor:
    """m / ||W + ΔW|| per output row (out,), in the adapter's dtype: DoRA's rescaling of the whole output."""
    delta = delta_weight(A, B, scale)
    return magnitude / weight_norm(W.to(delta.dtype), delta)


def dora_rescale_base_(y: Tensor, factor: Tensor, bias: Tensor | None) -> None:
    """y += factor ⊙ (y - bias) in place: DoRA's (ratio - 1) · base output (the base output without its bias).

    y (..., out); factor broadcastable to y ((out,) for one adapter, (batch, 1, out) per row).
    """
    base = y if bias is None else y - bias
    y.add_(base * factor.to(y.dtype))


def dora_merged_weight(W: Tensor, delta: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """The merged DoRA weight W' = m / ||W + ΔW|| · (W + ΔW), and the norm needed to unmerge.

    W, delta: (out, in); magnitude: (out,). Returns (W', norm (out,)).
    """
    norm = weight_norm(W, delta)
    return (magnitude / norm).unsqueeze(1) * (W + delta), norm


def dora_unmerged_weight(W_merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """Inverse of `dora_merged_weight`: W = W' · ||W + ΔW|| / m - ΔW."""
    return W_merged * (norm / magnitude).unsqueeze(1) - delta


def pissa_factors(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA init: A, B from the top-r SVD of W, and the residual weight that keeps the output unchanged.

    W = U S Vᴴ; with S_r = S[:r] / s:  A = √S_r · Vᴴ[:r] (r, in),  B = U[:, :r] · √S_r (out, r),
    W_res = W - s · B A, so W_res + s · B A = W exactly (up to rounding).
    Returns (A, B, W_res) in fp32.
    """
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    root = (S[:r] / scale).sqrt()
    A = root.unsqueeze(1) * Vh[:r]
    B = U[:, :r] * root.unsqueeze(0)
    return A, B, W.float() - delta_weight(A, B, scale)


# -- ΔW from its factors, without forming the (out, in) matrix ---------------------------------------------
# Adapter tools (inspect --spectrum, resize, combine) work on Linear-shaped factors: a Conv2d's A is
# flattened to (r, in·kh·kw) and B to (out, r) by the caller; an Embedding's (r, num) / (dim, r) already are.


def delta_svd(A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ΔW = s · B @ A computed from the factors: ΔW = U diag(S) Vh.

    With B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small
    (r × r) core gives the SVD of ΔW in O(r²·(in + out)) instead of O(in·out·min(in, out)), exactly.

    Args:
        A: (r, in). B: (out, r). scale: s (any sign).
    Returns:
        U (out, k), S (k,) descending, Vh (k, in) in float64, k = min(r, in, out).
    """
    A, B = A.double(), B.double()
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.t())
    uc, S, vhc = torch.linalg.svd((rb @ ra.t()) * scale, full_matrices=False)
    return qb @ uc, S, vhc @ qa.t()


def delta_singular_values(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The singular values of ΔW = s · B @ A (float64, descending, min(r, in, out) of them), as `delta_svd`
    computes them but from the R factors alone (no Q, no singular vectors): cheaper for inspection."""
    rb = torch.linalg.qr(B.double(), mode="r").R
    ra = torch.linalg.qr(A.double().t(), mode="r").R
    return torch.linalg.svdvals((rb @ ra.t()) * abs(scale))


def svd_factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """LoRA factors of the rank-`rank` truncation of U diag(S) Vh, for an adapter with scaling `scale`.

    The singular values are split evenly (A = √(S/|s|)·Vh, B = ±U·√(S/|s|)), so s · B @ A equals
    U[:, :k] diag(S[:k]) Vh[:k] (the best rank-k approximation, Eckart–Young) up to rounding.

    Returns:
        A (k, in), B (out, k) in the input dtype, k = min(rank, len(S)).
    """
    k = min(rank, S.shape[0])
    root = (S[:k] / abs(scale)).sqrt()
    sign = 1.0 if scale > 0 else -1.0
    return root.unsqueeze(1) * Vh[:k], U[:, :k] * (root * sign).unsqueeze(0)


def delta_norm(A: Tensor, B: Tensor, scale: float) -> float:
    """‖s · B @ A‖_F without forming the matrix: ‖BA‖² = trace((BᵀB)(AAᵀ)). A: (r, in), B: (out, r)."""
    A, B = A.double(), B.double()
    sq = ((B.t() @ B) * (A @ A.t())).sum().clamp_min(0.0)
    return float(sq.sqrt()) * abs(scale)


def concat_factors(factors: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """One pair of scale-1 factors for Σᵢ sᵢ · Bᵢ @ Aᵢ, exactly: A stacked, B side by side.

    Each coefficient sᵢ (a LoRA scaling times a user weight, any sign) is applied once, split as
    √|sᵢ| on Aᵢ and ±√|sᵢ| on Bᵢ so both halves keep comparable magnitudes:
        [±√|s₁|B₁, ±√|s₂|B₂, …] @ [√|s₁|A₁; √|s₂|A₂; …] = Σᵢ sᵢ Bᵢ Aᵢ.

    Args:
        factors: (A (rᵢ, in), B (out, rᵢ), sᵢ) per term; ranks may differ.
    Returns:
        A (Σrᵢ, in), B (out, Σrᵢ).
    """
    As, Bs = [], []
    for A, B, s in factors:
        root, signed = split_coefficient(s)
        As.append(A * root)
        Bs.append(B * signed)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def split_coefficient(s: float) -> tuple[float, float]:
    """(√|s|, sign(s)·√|s|): a coefficient split over two factors whose product it scales, keeping both
    halves' magnitudes comparable (√|s| · sign(s)√|s| = s)."""
    root = abs(s) ** 0.5
    return root, (root if s >= 0 else -root)
