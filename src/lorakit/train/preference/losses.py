"""Preference losses as pure functions of per-sequence log-probabilities (no model, no state).

Notation: for a prompt x and an answer y, log π(y|x) = Σ_t log π(y_t | x, y_<t) over the answer tokens
("logps", summed); π is the policy (the model with its adapter), π_ref the reference (the same model with the
adapter disabled). Every function returns per-example losses (B,); the training loss is their mean. Each
formula is TRL's (trl 1.16 DPOTrainer / experimental ORPOTrainer / KTOTrainer, label smoothing off), tested
against it to 1e-5 on values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO and its IPO / hinge variants.

    With the log-ratios r_c = log π(y_c|x) - log π_ref(y_c|x) and r_r likewise for the rejected answer:
        sigmoid (DPO):  loss = -log σ(β · (r_c - r_r))
        hinge (SLiC):   loss = max(0, 1 - β · (r_c - r_r))
        ipo:            loss = (r_c / |y_c| - r_r / |y_r| - 1 / (2β))²   (log-ratios averaged per answer token)

    Args:
        chosen, rejected, ref_chosen, ref_rejected: (B,) summed answer log-probs.
        chosen_tokens, rejected_tokens: (B,) answer token counts; required by "ipo".
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards β · r (detached) are the
        implicit rewards whose comparison gives the reward accuracy.
    Raises:
        ValueError: an unknown loss_type, or "ipo" without token counts.
    """
    r_c, r_r = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (r_c - r_r))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (r_c - r_r))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "the ipo loss averages log-ratios per token: pass chosen_tokens and rejected_tokens"
            )
        delta = r_c / chosen_tokens.clamp(min=1) - r_r / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r} is invalid: expected one of {DPO_LOSSES}")
    return losses, beta * r_c.detach(), beta * r_r.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean: Tensor, rejected_mean: Tensor, chosen_nll: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO: the SFT loss on the chosen answer plus an odds-ratio penalty; no reference model.

    With the per-token mean log-probs l_c, l_r (so odds(y) = e^l / (1 - e^l)):
        log_odds = (l_c - l_r) - (log(1 - e^{l_c}) - log(1 - e^{l_r}))
        loss = nll_c - β · log σ(log_odds)

    Args:
        chosen_mean, rejected_mean: (B,) answer log-probs averaged per answer token (< 0).
        chosen_nll: (B,) the chosen answer's mean token cross-entropy (the SFT term).
    Returns:
        (losses (B,), chosen_rewards β·l_c, rejected_rewards β·l_r), the rewards detached.
    """
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: the batch mean of log π(y'|x) - log π_ref(y'|x) over mismatched pairs
    (x, y'), clamped at 0 and detached (no gradient flows through it)."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Eq. 7 of Ethayarajh et al. 2024) on unpaired answers.

    With r = log π(y|x) - log π_ref(y|x) and z0 = `kl` (see `kto_kl`):
        desirable y:    loss = w_d · (1 - σ(β · (r - z0)))
        undesirable y:  loss = w_u · (1 - σ(β · (z0 - r)))

    Args:
        logps, ref_logps: (B,) summed answer log-probs. desirable: (B,) bool labels. kl: 0-dim z0.
    Returns:
        (losses (B,), rewards β·r (B,), detached).
    """
    r = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad), beta * r.detach()


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's std + 1e-4 when `scale`.

    rewards: (G·K,) with the K = `group_size` completions of one prompt adjacent. The std is the unbiased
    one (torch.std), as TRL's `scale_rewards="group"`.
    """
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    kl_correction: bool = True,
    epsilon_high: float | None = None,
) -> Tensor:
    """GRPO's clipped objective (TRL's loss_type "grpo"), per completion.

    Per completion token t, with ratio ρ_t = exp(log π(t) - log π_old(t)) and the completion's advantage A:
        ℓ_t = -min(ρ_t · A, clip(ρ_t, 1 - ε, 1 + ε_high) · A) + β · ρ_t · (exp(q_t) - q_t - 1),
        q_t = log π_ref(t) - log π(t)
    (the second term, the k3 estimate of KL(π || π_ref), only when β > 0; the factor ρ_t, TRL's default
    `use_bias_correction_kl`, makes its gradient the unbiased reverse-KL gradient for samples from π_old; off
    with `kl_correction=False`), and the completion's loss is the mean of ℓ_t over its tokens. ε_high is
    `epsilon_high`, ε when None (TRL's asymmetric clip, DAPO's "clip-higher").

    Args:
        logps, old_logps, ref_logps: (B, T) per-token log-probs of the completion tokens (old: the policy that
            sampled them, detached; ref: the adapter disabled). advantages: (B,). mask: (B, T) 1 on real tokens.
    Returns:
        (B,) per-completion losses; the batch loss is their mean.
    """
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    high = epsilon if epsilon_high is None else epsilon_high
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + high) * a)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the reference's per-token log-probs)")
        q = ref_logps - logps
        kl = torch.exp(q) - q - 1
        per_token = per_token + beta * (kl * ratio if kl_correction else kl)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def clip_fractions(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon: float, epsilon_high=None
) -> dict[str, Tensor]:
    """Per completion, the fraction of its tokens where `grpo_loss`'s clip binds (its gradient is cut), as
    TRL's metrics: "low" where ρ_t < 1 - ε and A < 0, "high" where ρ_t > 1 + ε_high and A > 0, "region"
    either. Returns {"low", "high", "region"}: (B,) float, detached (0 for a completion without tokens)."""
    ratio = torch.exp(logps.detach() - old_logps)
    a = advantages.unsqueeze(1)
    high = epsilon if epsilon_high is None else epsilon_high
    low_hit, high_hit = (ratio < 1 - epsilon) & (a < 0), (ratio > 1 + high) & (a > 0)
    mask = mask.to(ratio.dtype)
    n = mask.sum(1).clamp(min=1.0)
    hits = {"low": low_hit, "high": high_hit, "region": low_hit | high_hit}
    return {k: (v.to(ratio.dtype) * mask).sum(1) / n for k, v in hits.items()}
