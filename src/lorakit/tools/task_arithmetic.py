"""TIES, DARE and magnitude pruning: merging the ΔWᵢ of several adapters element by element.

These are the methods of PEFT's `add_weighted_adapter` beyond the weighted sum, in their `*_svd` form: each
acts on the full update ΔWᵢ = sᵢ·BᵢAᵢ of one module (a "task vector"), and the merged ΔW is then written as
its best rank-K factors (`combine --method ties --rank K`). With wᵢ the weights, d the density (the fraction
of entries kept), and everything element-wise over one module:

- magnitude_prune:  ΔW = Σᵢ wᵢ · topₖ(ΔWᵢ)
      topₖ keeps the k = ⌊d·numel⌋ entries of largest |ΔWᵢ| and zeroes the rest.
- ties (Yadav et al. 2023, "TIES-Merging"):  Tᵢ = wᵢ · topₖ(ΔWᵢ);  γ = sign(Σᵢ topₖ(ΔWᵢ)) (0 counts as +;
      "total") or sign(Σᵢ sign(topₖ(ΔWᵢ))) ("frequency");  ΔW = Σᵢ Tᵢ·[sign(topₖ ΔWᵢ) = γ] / max(1, #{i: sign = γ})
      (the disjoint mean: entries whose sign disagrees with the elected one drop out; note that an entry pruned
      to 0 has sign 0 and so never counts).
- dare_linear (Yu et al. 2024, "DARE"):  ΔW = Σᵢ wᵢ · (Mᵢ ⊙ ΔWᵢ) / d,  Mᵢ ~ Bernoulli(d) i.i.d.; unbiased:
      E[ΔW] = Σᵢ wᵢ ΔWᵢ.
- dare_ties: TIES with the random rescaled pruning of DARE in place of topₖ.

DARE is random: the masks are drawn with torch's global generator seeded by `seed` (`combine` forks the
RNG, so the caller's is untouched), one `torch.bernoulli(full(shape, d, float32))` per (module, adapter),
modules in natural name order (layers.2 before layers.10), adapters in the order given: the same seed gives
the same adapter. PEFT draws its masks with the same call, but after initialising the new adapter's weights
from the same generator, so a seed does not reproduce PEFT's masks; the DARE formulas are tested against
PEFT with both given the same masks (and for unbiasedness on their own).
"""

from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """The boolean mask of the ⌊density·numel⌋ entries of largest magnitude (density >= 1: all)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.reshape(delta.shape)


def random_prune(delta: Tensor, density: float) -> Tensor:
    """DARE's drop and rescale: each entry kept with probability `density` (then divided by it)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32, device=delta.device))
    return delta * mask.to(delta.dtype) / density


def elect_and_merge(pruned: list[Tensor], weights: list[float], sign_method: str = "total") -> Tensor:
    """TIES's sign election and disjoint mean over `pruned` task tensors (see the module docstring)."""
    stacked = torch.stack(pruned)
    sign = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = sign == elected
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_deltas(
    deltas: list[Tensor], weights: list[float], method: str, density: float, sign_method: str = "total"
) -> Tensor:
    """The merged ΔW of one module by `method` (one of METHODS) from the inputs' ΔWᵢ (same shape).

    Raises:
        ValueError: an unknown method or sign method, or a density outside (0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"combine: --method {method!r} is not a task-arithmetic method {METHODS}")
    if sign_method not in SIGN_METHODS:
        raise ValueError(
            f"combine: --majority-sign {sign_method!r} is invalid: expected one of {SIGN_METHODS}"
        )
    if not 0.0 < density <= 1.0:
        raise ValueError(f"combine: --density {density!r} is invalid: expected a fraction in (0, 1]")
    if method in ("ties", "magnitude_prune"):
        pruned = [d * magnitude_mask(d, density) for d in deltas]
    else:
        pruned = [random_prune(d, density) for d in deltas]
    if method in ("ties", "dare_ties"):
        return elect_and_merge(pruned, weights, sign_method)
    return sum(w * p for w, p in zip(weights, pruned))
