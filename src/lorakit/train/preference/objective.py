"""The micro-batch loss of the preference modes: the hook `train/loop.py` calls instead of the SFT loss.

    obj = objective_for(cfg)          # None for sft / cpt
    s, n, metrics = obj.micro_loss(model, examples, pad_id)   # loss sum over n units (pairs / rows)

An optimizer step's loss is Σ s / Σ units over all its micro-batches and processes, where `units(ex)` is 1
for every pair (DPO, ORPO) or row (KTO): the mean per-example loss over the step, as TRL's mean over a batch.
`metrics` are sums over the micro-batch's examples, divided by the same count by the loop.

KTO's reference point z0 is one number per optimizer step (`step_options`, before the step's micro-batches):
the mean over all the step's rows, on every process, of log π(y'|x) - log π_ref(y'|x) on mismatched pairs
(prompt i with the answer of row i - 1 of the same micro-batch, TRL's rotation), clamped at 0, detached. With
one micro-batch per step this is TRL's KTOTrainer exactly (its per-process means averaged over processes, equal
batch sizes); under gradient accumulation TRL takes a z0 per micro-batch, lorakit one per step, so that the
update does not depend on how a step's micro-batches are spread over processes and accumulation (as for
every other mode; the mismatched pairs, built within a micro-batch, still depend on the micro-batch size).

The reference log-probs are the same model's under `lorakit.disable_adapters` (no second model), computed
without gradients, or precomputed once (`precompute_ref`). Chosen and rejected go through one forward (the
batch is [chosen; rejected], right-padded), which is exact: attention masks keep rows independent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ...adapters import disable_adapters
from ...data.preference import MODES, collate_kto, collate_pairs
from ...losses import why_not_chunked
from .. import distributed
from .losses import dpo_loss, kto_kl, kto_loss, orpo_loss

IGNORE = -100


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token log-probs of the labelled tokens of each row, and their count.

    labels are unshifted (position t predicts t + 1), -100 where no loss is taken; see `token_logps`.

    Returns:
        (logps (B,) float32, differentiable; n_tokens (B,) float32).
    """
    return token_logps(model, input_ids, attention_mask, labels).sum(1), (labels[:, 1:] != IGNORE).sum(
        1
    ).float()


def token_logps(
    model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, temperature: float = 1.0
) -> Tensor:
    """Per-token next-token log-probs (B, T - 1): entry t is log p(labels[t + 1]); 0 where labels are -100.
    `temperature`: of softmax(logits / temperature), the distribution GRPO's rollouts were sampled from.

    The output head runs on the labelled positions only (never all B·T·V logits), unless the model changes its
    logits after the head (then the full logits are taken).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if why_not_chunked(model) == "":
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][
            keep
        ]
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    picked = torch.log_softmax(logits, -1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=labels.device)
    return out.masked_scatter(keep, picked)


def reference_logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """`sequence_logps` of the reference: the same model with its adapters disabled, without gradients."""
    with torch.no_grad(), disable_adapters(model):
        return sequence_logps(model, input_ids, attention_mask, labels)[0]


@dataclass
class PreferenceObjective:
    """The loss of one preference mode ("dpo", "orpo" or "kto") with its options."""

    mode: str
    beta: float = 0.1
    loss_type: str = "sigmoid"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def units(self, example) -> int:
        """What the step's loss is averaged over: one per pair or row."""
        return 1

    def tokens(self, example) -> int:
        return example.n_tokens

    def micro_loss(
        self, model, examples: list, pad_id: int, kl: float | None = None
    ) -> tuple[Tensor, int, dict[str, float]]:
        """(Σ per-example losses (0-dim, differentiable), len(examples), metric sums).

        kl: KTO's z0 for this micro-batch (the step's, from `step_options`); None: estimated from this
            micro-batch alone (TRL's definition for one batch; evaluation).
        """
        device = next(p.device for p in model.parameters())
        if self.mode == "kto":
            batch = {k: v.to(device) for k, v in collate_kto(examples, pad_id).items()}
            losses, metrics = self._kto(model, batch, kl)
        else:
            batch = {k: v.to(device) for k, v in collate_pairs(examples, pad_id).items()}
            losses, metrics = self._pairs(model, batch)
        return losses.sum(), len(examples), metrics

    def _pairs(self, model, batch: dict) -> tuple[Tensor, dict[str, float]]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logps, n = sequence_logps(model, ids, mask, labels)
        chosen, rejected = logps.chunk(2)
        n_c, n_r = n.chunk(2)
        if self.mode == "orpo":
            mean_c, mean_r = chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1)
            losses, rc, rr = orpo_loss(mean_c, mean_r, -mean_c, self.beta)
        else:
            if "ref_chosen" in batch:
                ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
            else:
                ref_c, ref_r = reference_logps(model, ids, mask, labels).chunk(2)
            losses, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, self.beta, self.loss_type, n_c, n_r)
        metrics = {
            "reward_accuracy": float((rc > rr).sum()),
            "reward_margin": float((rc - rr).sum()),
            "logps_chosen": float(chosen.detach().sum()),
            "logps_rejected": float(rejected.detach().sum()),
        }
        return losses, metrics

    def step_options(self, engine, micros: list[list], pad_id: int, ctx) -> dict[str, float]:
        """What every micro-batch of one optimizer step shares: {"kl": z0} for KTO (see the module docstring;
        no-gradient forwards of the mismatched pairs, policy and reference, through `engine`, and one
        all-reduce over the processes), {} for the paired modes. Every process must call it."""
        if self.mode != "kto":
            return {}
        total, rows = 0.0, 0
        with torch.no_grad():
            for micro in micros:
                total += float(engine.run(functools.partial(self.kl_sum, examples=micro, pad_id=pad_id)))
                rows += len(micro)
        device = next(p.device for p in engine.model.parameters())
        total, rows = distributed.sum_scalar(ctx, total, device), distributed.sum_scalar(ctx, rows, device)
        return {"kl": max(0.0, total / max(rows, 1))}

    def kl_sum(self, model, examples: list, pad_id: int) -> Tensor:
        """Σ over the micro-batch of log π(y'|x) - log π_ref(y'|x) on its mismatched pairs (0-dim float64)."""
        device = next(p.device for p in model.parameters())
        b = collate_kto(examples, pad_id)
        kl_args = tuple(b[k].to(device) for k in ("kl_input_ids", "kl_attention_mask", "kl_labels"))
        with torch.no_grad():
            kl_logps = sequence_logps(model, *kl_args)[0]
        return (kl_logps - reference_logps(model, *kl_args)).double().sum()

    def _kto(self, model, batch: dict, kl: float | None = None) -> tuple[Tensor, dict[str, float]]:
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        if kl is None:
            kl_args = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
            with torch.no_grad():
                kl_logps = sequence_logps(model, *kl_args)[0]
            kl = kto_kl(kl_logps, reference_logps(model, *kl_args))
        else:
            kl = torch.tensor(kl, dtype=torch.float32, device=logps.device)
        if "ref" in batch:
            ref = batch["ref"]
        else:
            ref = reference_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        desirable = batch["label"]
        losses, rewards = kto_loss(
            logps, ref, desirable, kl, self.beta, self.desirable_weight, self.undesirable_weight
        )
        lp = logps.detach()
        metrics = {
            "kl": float(kl) * len(lp),  # a sum over rows like the others: the loop divides by the row count
            "rewards_desirable": float(rewards[desirable].sum()),
            "rewards_undesirable": float(rewards[~desirable].sum()),
            "logps_desirable": float(lp[desirable].sum()),
            "logps_undesirable": float(lp[~desirable].sum()),
        }
        return losses, metrics

    @torch.no_grad()
    def evaluate(self, model, examples: list, batch_size: int, pad_id: int) -> dict[str, float]:
        """eval_loss and eval_<metric> means over `examples` (eval mode, restored afterwards)."""
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        try:
            for i in range(0, len(examples), batch_size):
                s, _, metrics = self.micro_loss(model, examples[i : i + batch_size], pad_id)
                for k, v in {"loss": float(s), **metrics}.items():
                    totals[k] = totals.get(k, 0.0) + v
        finally:
            model.train(was_training)
        n = max(1, len(examples))
        return {f"eval_{k}": round(v / n, 6) for k, v in totals.items()}


def objective_for(cfg) -> PreferenceObjective | None:
    """The preference objective of `cfg.mode`, or None for the token-level modes (sft, cpt)."""
    if cfg.mode not in MODES:
        return None
    return PreferenceObjective(
        cfg.mode, cfg.beta, cfg.loss_type, cfg.desirable_weight, cfg.undesirable_weight
    )


@torch.no_grad()
def precompute_reference(model, examples: list, batch_size: int, pad_id: int) -> None:
    """Store the reference log-probs on every example once (the adapter disabled); training then skips the
    reference forward. KTO's KL term pairs rows of a micro-batch, so its reference stays live."""
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()  # no dropout anywhere in the reference
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            if hasattr(chunk[0], "chosen"):
                b = collate_pairs(chunk, pad_id)
                ref = reference_logps(
                    model, *(b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                )
                for ex, c, r in zip(chunk, *ref.chunk(2)):
                    ex.ref_chosen, ex.ref_rejected = float(c), float(r)
            else:
                b = collate_kto(chunk, pad_id)
                ref = reference_logps(
                    model, *(b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                )
                for ex, r in zip(chunk, ref):
                    ex.ref = float(r)
    finally:
        model.train(was_training)
