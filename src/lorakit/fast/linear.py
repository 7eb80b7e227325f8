"""A hand-derived autograd Function for Linear (or GPT-2 Conv1D) layers with one LoRA adapter each, sharing one
input: a single layer, or the k projections that read the same x (q/k/v, gate/up), fused. And the no-grad path.

Notation (per layer, rows flattened): x (N, in), frozen W (out, in), bias b (out,), A (r, in), B (out, r),
scale s, dropout p with keep-mask M ∈ {0, 1}^(N×in) and D(x) = M ⊙ x / (1 - p) (D = identity when p = 0):

    u = D(x) Aᵀ                       (N, r)     the rank-r intermediate
    y = x Wᵀ + b + s · u Bᵀ           (N, out)

Backward, from dy (N, out), with W frozen:

    g  = dy B                         (N, r)
    dB = s · dyᵀ u                    (out, r)
    dA = s · gᵀ D(x)                  (r, in)
    dx = dy W + s · D(g A)            (N, in)   D applied to a gradient: M ⊙ (·) / (1 - p)

Since D(x) Aᵀ = ((M ⊙ x) Aᵀ) / (1 - p), the factor 1 / (1 - p) is applied to the N×r tensors u and g, never
to an N×in one: with dropout each module makes one masked copy of x in forward and one in backward.
Large transient tensors are kept few, since on CPU a fresh one costs page faults that can exceed the
arithmetic (a 1024×1536 `x * mask` measured 0.6 ms with the allocator's pages kept, 6-11 ms without): in
forward the random bits, the float mask and D(x)·(1-p) share one buffer; in backward the uint8 mask becomes
a float one once, D(x) is formed in the rebuilt x's own storage, and that buffer then receives M ⊙ (G A),
into which the base terms dy W are accumulated (addmm_): dx itself allocates nothing.
    db = Σ_rows dy                    (out,)    only when the bias trains

Fused (k layers i on one x, A_cat = [A_1; …; A_k] (R = Σ rᵢ, in)): one u = D(x) A_catᵀ (N, R) whose column
block i feeds layer i; in backward one G = [g_1 … g_k] (N, R), one dA_cat = Gᵀ D(x) split by rows, and one dx
accumulated in place: dx = dy_1 W_1, += dy_i W_i, += D(G A_cat). The k layers share one dropout mask (they
read the same x; each branch still sees dropout p) and one saved x.

What is saved for backward: x itself (the *same* tensor object the caller passed, so q/k/v, which share their
input, keep one copy between them, and so do gate/up), u (N×r, 1/36 of x at in = 576, r = 16: cheaper to keep
than to recompute), and, with dropout, the keep-mask as 0/1 bytes (1 byte per element instead of a 4-byte copy
of D(x) per module, which is what generic autograd keeps). dx is accumulated in place: dx = dy W, then addmm_.
Where x's producer is recognised (fast/recompute.py: an RMSNorm, act(gate) · up), x is not saved at all: the
Function keeps references to the operands the base's graph already keeps and rebuilds x bitwise in backward.

The mask comes from a generator seeded by one draw from torch's global RNG, so `torch.manual_seed` makes runs
reproducible and activation checkpointing (which restores the RNG state) replays the same mask. Random bits are
drawn 64 at a time and used as four 16-bit lanes (about 9× faster than `bernoulli_` on CPU); p is therefore
rounded to a multiple of 2⁻¹⁶ (|Δp| ≤ 7.7e-6) and the kept values are scaled by the exact 1 / (1 - p').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as LF
from . import recompute


def dropout_keep_mask(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device
) -> tuple[Tensor, float]:
    """A keep-mask of `shape` (uint8: 1 = kept, 0 = dropped) and the exact keep scale 1 / (1 - p').

    Deterministic in `seed`. p' = round(p · 2¹⁶) / 2¹⁶ is the drop probability actually used. uint8 rather than
    bool: it is what the Function saves (1 byte per element), and it is converted to a float mask once per use.
    """
    keep, _, scale = keep_masks(shape, p, seed, device, torch.float32)
    return keep, scale


def keep_masks(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, float]:
    """(the uint8 keep-mask of `dropout_keep_mask`, the same mask as 0/1 in `dtype`, the keep scale).

    The random bits are drawn into the float mask's own storage (2 bytes per element of the 4 or 2 it has),
    compared into the uint8 mask, then overwritten by it: one N×in allocation besides the saved bytes, where
    `(lanes >= t).view(uint8)` and `x * keep` made four (bits, bool mask, `x * keep`'s float cast of the mask,
    its result), each paying page faults on CPU. `torch.ge(..., out=uint8)` is also ~6× faster on CPU than
    the comparison into a bool tensor (0.05 vs 0.32 ms for 1024×576, one thread).
    """
    n = 1
    for d in shape:
        n *= d
    words, size = (n + 3) // 4, torch.empty((), dtype=dtype).element_size()
    nbytes = -(-max(n * size, words * 8) // 8) * 8  # room for the int64 words, and a whole number of them
    buf = torch.empty(nbytes // size, dtype=dtype, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    bits = buf.view(torch.int64)[:words].random_(-(2**63), None, generator=g)
    lanes = bits.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    drop = min(max(round(p * 65536), 0), 65535)
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    torch.ge(lanes, drop - 32768, out=keep)
    del bits, lanes  # buf's bytes are free again: they become the float mask
    return keep, buf[:n].view(shape).copy_(keep), 65536.0 / (65536 - drop)


def draw_seed() -> int:
    """One draw from torch's global (CPU) RNG: the seed of one dropout mask."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


class LoraLinearFunction(torch.autograd.Function):
    """(y_1, …, y_k) with y_i = x W_iᵀ + b_i + s_i · (D(x) A_iᵀ) B_iᵀ, the backward of the module docstring.

    forward(x (..., in), p, seed, scales (k floats), addmm_bias, *tensors) with tensors = W_1..W_k (out_i, in)
    frozen, b_1..b_k (out_i,) or None, A_1..A_k (r_i, in), B_1..B_k (out_i, r_i). W may be a transposed view
    (Conv1D). A and B may be in a wider dtype than x (fp32 adapters on a bf16 base): the LoRA branch is then
    computed in A's dtype and added in x's, as the plain path does. addmm_bias: compute the base as
    torch.addmm(b, x, Wᵀ) (what Conv1D does) instead of F.linear. src: None (save x) or recompute.source(x)
    (plan, tensors): keep those tensors instead of x and rebuild x in backward. Returns a tuple of k outputs.
    """

    @staticmethod
    def forward(ctx, x, p, seed, scales, addmm_bias, src, *tensors):
        k = len(scales)
        Ws, bs, As, Bs = (tensors[i * k : (i + 1) * k] for i in range(4))
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        ys = []
        for W, b in zip(Ws, bs):
            ys.append(torch.addmm(b, x2, W.t()).view(*lead, -1) if addmm_bias else F.linear(x, W, b))
        A = As[0] if k == 1 else torch.cat(As)  # (R, in): one matmul of x for every layer
        keep, keep_scale = None, 1.0
        if p > 0.0:
            keep, keepf, keep_scale = keep_masks(tuple(x2.shape), p, seed, x.device, A.dtype)
            # 1/(1-p) goes on the rank-R side: one full-size pass instead of three. keepf becomes D(x)·(1-p)
            u = LF.lora_down(x2, A, keepf, keep_scale, scratch=keepf)
            del keepf
        else:
            u = LF.lora_down(x2, A)
        col = 0
        for y, B, s in zip(ys, Bs, scales):
            LF.lora_up_(y, u[:, col : col + B.shape[1]], B, s)
            col += B.shape[1]
        kept = (x,) if src is None else src[1]
        ctx.save_for_backward(A, u, keep, *Ws, *Bs, *kept)
        ctx.plan = None if src is None else src[0]  # how to rebuild x from `kept` (recompute.rebuild)
        ctx.x_shape = x.shape
        ctx.scales, ctx.keep_scale, ctx.has_bias = scales, keep_scale, [b is not None for b in bs]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        A, u, keep, *rest = ctx.saved_tensors
        k = len(ctx.scales)
        Ws, Bs, kept = rest[:k], rest[k : 2 * k], rest[2 * k :]
        needs = ctx.needs_input_grad[6:]
        need_b, need_A, need_B = needs[k : 2 * k], needs[2 * k : 3 * k], needs[3 * k : 4 * k]
        N = u.shape[0]
        dy2s = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
        dbs, dBs, gs = [None] * k, [None] * k, []
        col = 0
        for i, (dy2, B, s) in enumerate(zip(dy2s, Bs, ctx.scales)):
            r = B.shape[1]
            if dy2 is None:  # an output nobody used (autograd passes None): no gradient through it
                gs.append(u.new_zeros(N, r))
            else:
                dya = dy2 if dy2.dtype == A.dtype else dy2.to(A.dtype)
                if need_B[i]:
                    # (uᵀ dy)ᵀ rather than dyᵀ u: the same product, 1.6x faster on CPU at out = 1536 (MKL)
                    dBs[i] = (u[:, col : col + r].t() @ dya).mul_(s).t()
                # s and 1/(1-p) folded into g once (N×r) instead of into dA and dx (N×in)
                gs.append((dya @ B).mul_(s * ctx.keep_scale))
                if need_b[i] and ctx.has_bias[i]:
                    dbs[i] = dy2.sum(0)
            col += r
        G = gs[0] if k == 1 else torch.cat(gs, dim=1)  # (N, R)
        # With dropout the uint8 mask becomes a float one once, for both D(x) and D(G A); the N×in buffer
        # holding D(x) for dA is reused for G A and becomes dx (fresh N×in tensors cost page faults on CPU)
        keepf = None if keep is None else keep.to(A.dtype)
        dAs, xm = [None] * k, None
        if any(need_A):
            x = kept[0] if ctx.plan is None else recompute.rebuild(ctx.plan, kept)
            xa = x.reshape(N, -1)
            xa = xa if xa.dtype == A.dtype else xa.to(A.dtype)
            if keepf is not None:
                fresh = xa.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in kept}
                xm = xa.mul_(keepf) if fresh and xa.is_contiguous() else xa * keepf
                xa = xm
            dA = G.t() @ xa
            dAs = list(dA.split([B.shape[1] for B in Bs]))
            del x, xa  # a rebuilt x lives only for dA (or as the buffer of D(G A))
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _dx(dy2s, Ws, G, A, keepf, xm, Ws[0].dtype).view(ctx.x_shape)
        return (dx, None, None, None, None, None, *([None] * k), *dbs, *dAs, *dBs)


def _dx(dy2s, Ws, G: Tensor, A: Tensor, keepf, buf, dtype) -> Tensor:
    """dx = Σ dy_i W_i + D(G A), accumulated in place into one (N, in) buffer.

    keepf: the float keep-mask (None: no dropout). buf: None or a contiguous (N, in) tensor in A's dtype free
    to receive G A. With dropout (and dx in A's dtype) dx starts as M ⊙ (G A), in buf, and the base terms are
    accumulated into it: no N×in tensor is allocated here.
    """
    if keepf is not None and dtype == A.dtype:
        dx = (G @ A if buf is None else torch.mm(G, A, out=buf)).mul_(keepf)
        for dy2, W in zip(dy2s, Ws):
            if dy2 is not None:
                dx.addmm_(dy2, W)
        return dx
    dx = None
    for dy2, W in zip(dy2s, Ws):
        if dy2 is None:
            continue
        if dx is None:
            dx = dy2 @ W
        else:
            dx.addmm_(dy2, W)
    if dx is None:
        dx = torch.zeros(G.shape[0], A.shape[1], dtype=dtype, device=G.device)
    if keepf is None and dx.dtype == A.dtype:
        dx.addmm_(G, A)
        return dx
    t = G @ A
    if keepf is not None:
        t.mul_(keepf)
    dx.add_(t.to(dx.dtype))
    return dx


def lora_linear_train(
    x: Tensor,
    layers: list[tuple[Tensor, Tensor | None, Tensor, Tensor, float]],
    p: float,
    addmm_bias: bool,
    recompute_x: bool = False,
) -> tuple[Tensor, ...]:
    """Base + one adapter each for k layers reading x, through LoraLinearFunction.

    layers: (W (out, in) frozen, b or None, A, B, scale) per layer. p: the dropout probability (0 in eval).
    recompute_x: rebuild x in backward from what its producer keeps, when recognised (recompute.py).
    Returns the k outputs.
    """
    seed = draw_seed() if p > 0.0 else 0
    Ws, bs, As, Bs, scales = zip(*layers)
    src = recompute.source(x) if recompute_x else None
    return LoraLinearFunction.apply(x, p, seed, tuple(scales), addmm_bias, src, *Ws, *bs, *As, *Bs)
