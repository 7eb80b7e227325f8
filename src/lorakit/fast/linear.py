"""A hand-derived autograd Function for a Linear (or GPT-2 Conv1D) with one LoRA adapter, and the no-grad path.

Notation (per layer, rows flattened): x (N, in), frozen W (out, in), bias b (out,), A (r, in), B (out, r),
scale s, dropout p with keep-mask M ∈ {0, 1}^(N×in) and D(x) = M ⊙ x / (1 - p) (D = identity when p = 0):

    u = D(x) Aᵀ                       (N, r)     the rank-r intermediate
    y = x Wᵀ + b + s · u Bᵀ           (N, out)

Backward, from dy (N, out), with W frozen:

    g  = dy B                         (N, r)
    dB = s · dyᵀ u                    (out, r)
    dA = s · gᵀ D(x)                  (r, in)
    dx = dy W + s · D(g A)            (N, in)   D applied to a gradient: M ⊙ (·) / (1 - p)
    db = Σ_rows dy                    (out,)    only when the bias trains

What is saved for backward: x itself (the *same* tensor object the caller passed, so q/k/v, which share their
input, keep one copy between them, and so do gate/up), u (N×r, 1/36 of x at in = 576, r = 16: cheaper to keep
than to recompute), and, with dropout, the keep-mask as bools (1 byte per element instead of a 4-byte copy of
D(x) per module, which is what generic autograd keeps). dx is accumulated in place: dx = dy W, then addmm_.

The mask comes from a generator seeded by one draw from torch's global RNG, so `torch.manual_seed` makes runs
reproducible and activation checkpointing (which restores the RNG state) replays the same mask. Random bits are
drawn 64 at a time and used as four 16-bit lanes (about 9× faster than `bernoulli_` on CPU); p is therefore
rounded to a multiple of 2⁻¹⁶ (|Δp| ≤ 7.7e-6) and the kept values are scaled by the exact 1 / (1 - p').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dropout_keep_mask(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device
) -> tuple[Tensor, float]:
    """A bool keep-mask of `shape` (True = kept) and the exact keep scale 1 / (1 - p').

    Deterministic in `seed`. p' = round(p · 2¹⁶) / 2¹⁶ is the drop probability actually used.
    """
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=g)
    lanes = bits.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    drop = min(max(round(p * 65536), 0), 65535)
    return lanes >= drop - 32768, 65536.0 / (65536 - drop)


def draw_seed() -> int:
    """One draw from torch's global (CPU) RNG: the seed of one dropout mask."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _apply_mask(t: Tensor, keep: Tensor, keep_scale: float) -> Tensor:
    """D(t) in place on t (a fresh tensor): zero the dropped entries, scale the kept ones."""
    return t.mul_(keep).mul_(keep_scale)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ with the backward of the module docstring.

    forward(x (..., in), W (out, in) frozen, b (out,) or None, A (r, in), B (out, r), scale, p, seed,
    addmm_bias): W may be a transposed view (Conv1D). A and B may be in a wider dtype than x (fp32 adapters
    on a bf16 base): the LoRA branch is then computed in A's dtype and added in x's, as the plain path does.
    addmm_bias: compute the base as torch.addmm(b, x, Wᵀ) (what Conv1D does) instead of F.linear.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, scale, p, seed, addmm_bias):
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        if addmm_bias:
            y = torch.addmm(b, x2, W.t()).view(*lead, -1)
        else:
            y = F.linear(x, W, b)
        y2 = y.view(-1, y.shape[-1])
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        keep, keep_scale = None, 1.0
        if p > 0.0:
            keep, keep_scale = dropout_keep_mask(tuple(x2.shape), p, seed, x.device)
            xa = _apply_mask(xa.clone() if xa is x2 else xa, keep, keep_scale)
        u = xa @ A.t()
        if y.dtype == A.dtype:
            y2.addmm_(u, B.t(), alpha=scale)
        else:
            y2.add_((u @ B.t()).mul_(scale).to(y.dtype))
        ctx.save_for_backward(x, W, A, B, u, keep)
        ctx.scale, ctx.keep_scale, ctx.has_bias = scale, keep_scale, b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, u, keep = ctx.saved_tensors
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        s = ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1])
        dya = dy2 if dy2.dtype == A.dtype else dy2.to(A.dtype)
        dx = db = dA = dB = None
        if need_B:
            dB = (dya.t() @ u).mul_(s)
        if need_A or need_x:
            g = (dya @ B).mul_(s)  # s folded into g once (N×r) instead of into dA and dx
        if need_A:
            xa = x.reshape(-1, x.shape[-1])
            xa = xa if xa.dtype == A.dtype else xa.to(A.dtype)
            if keep is not None:
                xa = _apply_mask(xa.clone() if xa.dtype == x.dtype else xa, keep, ctx.keep_scale)
            dA = g.t() @ xa
        if need_x:
            dx = dy2 @ W
            if keep is None and dx.dtype == A.dtype:
                dx.addmm_(g, A)
            else:
                t = g @ A
                if keep is not None:
                    _apply_mask(t, keep, ctx.keep_scale)
                dx.add_(t.to(dx.dtype))
            dx = dx.view(x.shape)
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, None, db, dA, dB, None, None, None, None


def lora_linear_train(x: Tensor, W: Tensor, b: Tensor | None, w, training: bool, addmm_bias: bool) -> Tensor:
    """Base + one adapter through LoraLinearFunction. w: LoraWeights (A, B, scale, dropout)."""
    p = w.dropout if training else 0.0
    seed = draw_seed() if p > 0.0 else 0
    return LoraLinearFunction.apply(x, W, b, w.A, w.B, w.scale, p, seed, addmm_bias)


@torch.no_grad()
def add_lora_inplace(y: Tensor, x: Tensor, weights) -> Tensor:
    """y += Σ s · (x Aᵀ) Bᵀ over `weights` (LoraWeights), in place, no grad: one matmul and one addmm_ each.

    x (..., in), y (..., out) a fresh output (not a view of anything the caller keeps).
    """
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    for w in weights:
        xa = x2 if x2.dtype == w.A.dtype else x2.to(w.A.dtype)
        u = xa @ w.A.t()
        if y.dtype == w.A.dtype:
            y2.addmm_(u, w.B.t(), alpha=w.scale)
        else:
            y2.add_((u @ w.B.t()).mul_(w.scale).to(y.dtype))
    return y
