"""GRPO's micro-batch loss: the objective `train/loop.py` calls for `--mode grpo` (see objective.py's contract).

    obj = GrpoObjective(rewards, engine, num_generations=G, temperature=..., max_new_tokens=..., beta=...)
    s, n, metrics = obj.micro_loss(model, examples, pad_id)   # examples: data.prompts.PromptExample
    for fns in obj.updates(micro_batches, pad_id): ...        # μ optimizer updates, fn(model) -> (s, n, metrics)

One micro-batch is `batch_size` prompt rows; for each of them, in order:
1. rollouts: G completions per prompt, sampled by `rollout.LiveEngine` (lorakit's serving engine) from the live
   model and adapter, in eval mode, each request with its own seed drawn from torch's global generator;
2. rewards: every reward function scores every completion; a completion's reward is their sum; advantages are
   `group_advantages` over each prompt's G completions;
3. the policy loss `grpo_loss` on the completion tokens: log-probs of the policy (train mode, with gradients)
   and, when beta > 0, of the reference (the same model under `disable_adapters`, no gradients).
`units(ex)` is G, so the loop's step loss is the mean over the step's completions of their token-mean loss.

Choices against TRL's GRPOTrainer (trl 1.16), which this follows unless said:
- Generation: TRL samples one generation batch of `per_device_train_batch_size × steps_per_generation`
  completions (steps_per_generation defaults to the accumulation steps), slices it into the micro-batches and
  reuses it `num_iterations` times. Here each micro-batch samples its own rollouts: no optimizer step happens
  inside an accumulation cycle, so every micro-batch sees the weights TRL's single generation saw.
- `iterations` μ (TRL's num_iterations, default 1): with μ = 1 the loss is on-policy, the old log-probs are
  the current ones detached (TRL: `old_per_token_logps = per_token_logps.detach()`), the ratio is exactly 1
  and the clip never binds. With μ > 1, `updates` gives the loop μ optimizer updates over one rollout batch:
  the first samples, scores and keeps it (completions, advantages, reference log-probs) and takes the old
  log-probs as its own forward's, detached: the policy before any update of the batch (TRL runs a separate
  no-grad forward for them; the same values when dropout is 0, one forward less). Updates 2..μ replay the
  kept batch against those old log-probs, so the ratio moves and the clip (ε, ε_high) binds. All μ updates
  are one lorakit step: a checkpoint falls between rollout batches and never holds a buffer. One lorakit step
  is μ of TRL's global steps; the lr schedule counts optimizer updates (steps × μ, warmup × μ), as TRL's.
- loss_type "grpo" (each completion's token mean, then the mean over completions), the paper's; TRL 1.16
  defaults to "dapo" (one mean over all tokens of the batch). Advantages: TRL's scale_rewards="group".
- `--batch-size` counts prompts (TRL's per_device_train_batch_size counts completions); a group never spans
  two micro-batches.
- Log-probs are of softmax(logits / temperature), the distribution sampled, as in TRL.
- Completions end at EOS (kept, with its loss, as TRL's completion mask) or at max_new_tokens (kept:
  TRL's mask_truncated_completions=False). Sampling is temperature only (TRL's top_p=1, top_k=0).
- Reward weights are all 1 (TRL's default); a reward that is not a finite number is an error (TRL lets a
  function return None to skip a completion).
- KL: the k3 estimate with TRL's default bias correction (inside `grpo_loss`), computed only when beta > 0.
- Metrics of the loss (kl; with μ > 1 clip_ratio_low / _high / _region, TRL's clip_ratio/*_mean) are means over
  the step's μ updates; a clip ratio is each completion's fraction of clipped tokens, then the mean over the
  completions (TRL: one fraction over all tokens of the batch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ...adapters import disable_adapters
from .losses import clip_fractions, group_advantages, grpo_loss
from .objective import token_logps
from .rewards import Reward, completion_text, extract_answer, normalize
from .rollout import LiveEngine, Rollout, draw_seeds, sample

IGNORE = -100


@dataclass
class GrpoObjective:
    """GRPO's loss with its reward functions, the rollout engine over the training model, and its options."""

    rewards: list[Reward]
    engine: LiveEngine
    num_generations: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    beta: float = 0.0
    answer_field: str = "answer"  # the exact-match metric's reference (when the rows have it)
    iterations: int = 1  # μ: optimizer updates per rollout batch
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon

    def units(self, example) -> int:
        """What the step's loss is averaged over: the prompt's G completions."""
        return self.num_generations

    def tokens(self, example) -> int:
        """The step's token count for the progress line: the prompts of the G sequences (the completions'
        lengths are known only after sampling)."""
        return example.n_tokens * self.num_generations

    def rollouts(self, examples: list, n: int, temperature: float) -> list[Rollout]:
        """`n` completions per example from the live model (eval mode meanwhile, restored after)."""
        model = self.engine.model
        was_training = model.training
        model.eval()
        try:
            seeds = draw_seeds(len(examples) * n) if temperature > 0 else None
            prompts = [ex.prompt_ids for ex in examples]
            return sample(self.engine, prompts, n, temperature, self.max_new_tokens, seeds)
        finally:
            model.train(was_training)

    def score(self, examples: list, rollouts: list[Rollout]) -> tuple[Tensor, dict[str, list[float]]]:
        """(total rewards (N,) float32, each function's rewards by name), TRL's calling convention."""
        prompts = [examples[r.prompt].prompt for r in rollouts]
        chat = [isinstance(p, list) for p in prompts]
        completions = [
            [{"role": "assistant", "content": r.text}] if c else r.text for r, c in zip(rollouts, chat)
        ]
        names = sorted({k for ex in examples for k in ex.fields})
        fields = {k: [examples[r.prompt].fields.get(k) for r in rollouts] for k in names}
        each = {rw.name: rw(prompts, completions, fields) for rw in self.rewards}
        total = torch.tensor(
            [sum(v[i] for v in each.values()) for i in range(len(rollouts))], dtype=torch.float32
        )
        return total, each

    def updates(self, micros: list[list], pad_id: int) -> list[list[functools.partial]]:
        """One lorakit step's optimizer updates: μ lists, each of one call `fn(model) -> (s, n, metrics)` per
        micro-batch of `micros` (lists of prompt examples). The first list samples the rollouts (and keeps them
        when μ > 1); the others replay them. Call the lists in order, an optimizer update after each."""
        if self.iterations == 1:
            return [[functools.partial(self.micro_loss, examples=m, pad_id=pad_id) for m in micros]]
        kept: list[dict] = [{} for _ in micros]
        first = [
            functools.partial(self.micro_loss, examples=m, pad_id=pad_id, keep=k)
            for m, k in zip(micros, kept)
        ]
        replay = [functools.partial(self.replay_loss, kept=k) for k in kept]
        return [first] + [replay] * (self.iterations - 1)

    def micro_loss(
        self, model, examples: list, pad_id: int, keep: dict | None = None
    ) -> tuple[Tensor, int, dict[str, float]]:
        """(Σ per-completion losses (0-dim, differentiable), completions, metric sums over the completions).
        `keep`: filled with what `replay_loss` needs (the completions, advantages, old and reference log-probs)."""
        g = self.num_generations
        rollouts = self.rollouts(examples, g, self.temperature)
        total, each = self.score(examples, rollouts)
        batch = completion_batch(examples, rollouts, pad_id, next(model.parameters()).device)
        advantages = group_advantages(total, g).to(batch["mask"].device)
        losses, logps, ref = self.loss(model, batch, advantages)
        metrics = self.metrics(examples, rollouts, total, each)
        metrics.update(self.loss_metrics(batch["mask"], logps, logps, advantages, ref))
        if keep is not None:
            keep.update(batch=batch, advantages=advantages, old=logps, ref=ref)
        return losses.sum(), len(rollouts), metrics

    def replay_loss(self, model, kept: dict) -> tuple[Tensor, int, dict[str, float]]:
        """`micro_loss` on the completions `kept` by the step's first update, against its old log-probs."""
        batch, advantages, old = kept["batch"], kept["advantages"], kept["old"]
        losses, logps, ref = self.loss(model, batch, advantages, old, kept["ref"])
        return losses.sum(), len(losses), self.loss_metrics(batch["mask"], logps, old, advantages, ref)

    def loss(
        self, model, batch: dict, advantages: Tensor, old: Tensor | None = None, ref: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(per-completion GRPO losses (N,), the policy's per-token log-probs detached (N, T - 1), the
        reference's or None when beta = 0). `old` None: on-policy (the log-probs detached); `ref` None: the
        reference forward runs here (when beta > 0)."""
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps = token_logps(model, *args, temperature=self.temperature)
        if self.beta != 0.0 and ref is None:
            with torch.no_grad(), disable_adapters(model):
                ref = token_logps(model, *args, temperature=self.temperature)
        old = logps.detach() if old is None else old
        eps = {"epsilon": self.epsilon, "epsilon_high": self.epsilon_high}
        losses = grpo_loss(logps, old, advantages, batch["mask"], beta=self.beta, ref_logps=ref, **eps)
        return losses, logps.detach(), ref

    def loss_metrics(self, mask, logps, old, advantages, ref) -> dict[str, float]:
        """kl (beta > 0: each completion's mean token k3 estimate) and, with μ > 1, the clip ratios, summed
        over the completions and divided by μ: the loop's sum over the μ updates is then their mean."""
        out = {}
        if ref is not None:
            q = (ref - logps) * mask
            kl = ((torch.exp(q) - q - 1) * mask).sum(1) / mask.sum(1).clamp(min=1)
            out["kl"] = float(kl.sum()) / self.iterations
        if self.iterations > 1:
            clipped = clip_fractions(logps, old, advantages, mask, self.epsilon, self.epsilon_high)
            out.update({f"clip_ratio_{k}": float(v.sum()) / self.iterations for k, v in clipped.items()})
        return out

    def metrics(self, examples, rollouts, total: Tensor, each: dict[str, list[float]]) -> dict[str, float]:
        """Sums over the completions (the loop divides by the step's completions, giving means). The `*_std`
        entries are the micro-batch's std times its size: with one micro-batch a step, the batch's std."""
        n, g = len(rollouts), self.num_generations
        out = {"reward": float(total.sum()), "reward_std": _std(total) * n}
        for name, values in each.items():
            v = torch.tensor(values, dtype=torch.float32)
            out[f"reward_{name}"], out[f"reward_{name}_std"] = float(v.sum()), _std(v) * n
        out["frac_reward_zero_std"] = float((total.view(-1, g).std(1) < 1e-6).sum()) * g
        out["completion_length"] = float(sum(len(r.ids) for r in rollouts))
        out["truncated"] = float(sum(r.truncated for r in rollouts))
        hits = exact_hits(examples, rollouts, self.answer_field)
        if hits is not None:
            out["exact_match"] = float(sum(hits))
        return out

    @torch.no_grad()
    def evaluate(self, model, examples: list, batch_size: int, pad_id: int) -> dict[str, float]:
        """eval_reward, eval_reward_<name>, eval_exact_match, eval_completion_length: means over `examples` of
        their greedy completions (one each), sampled by the engine like the rollouts. `model` and `pad_id`
        are the objective interface's; the engine holds the model (under DDP, this process's)."""
        totals: dict[str, float] = {}
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            rollouts = self.rollouts(chunk, 1, 0.0)
            total, each = self.score(chunk, rollouts)
            sums = {"reward": float(total.sum()), **{f"reward_{k}": float(sum(v)) for k, v in each.items()}}
            hits = exact_hits(chunk, rollouts, self.answer_field)
            if hits is not None:
                sums["exact_match"] = float(sum(hits))
            sums["completion_length"] = float(sum(len(r.ids) for r in rollouts))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        n = max(1, len(examples))
        return {f"eval_{k}": round(v / n, 6) for k, v in totals.items()}

    def describe(self, ev: dict) -> str:
        """An evaluation's progress line."""
        parts = [f"eval reward {ev['eval_reward']:.3f}"]
        if "eval_exact_match" in ev:
            parts.append(f"exact match {ev['eval_exact_match']:.1%}")
        return "  ".join(parts)


def exact_hits(examples: list, rollouts: list[Rollout], field: str) -> list[bool] | None:
    """Whether each completion's extracted final answer equals its row's `field`; None when a row lacks it."""
    refs = [examples[r.prompt].fields.get(field) for r in rollouts]
    if any(ref is None for ref in refs):
        return None
    return [extract_answer(completion_text(r.text)) == normalize(ref) for r, ref in zip(rollouts, refs)]


def completion_batch(examples: list, rollouts: list[Rollout], pad_id: int, device) -> dict[str, Tensor]:
    """prompt + completion of each rollout, right-padded: input_ids, attention_mask, labels (-100 but on the
    completion tokens) (N, T), and mask (N, T - 1): 1 where `token_logps` holds a completion token's log-prob."""
    seqs = [examples[r.prompt].prompt_ids + r.ids for r in rollouts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (s, r) in enumerate(zip(seqs, rollouts)):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        labels[i, len(s) - len(r.ids) : len(s)] = torch.tensor(r.ids)
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["mask"] = (batch["labels"][:, 1:] != IGNORE).float()
    return batch


def _std(values: Tensor) -> float:
    return float(values.std()) if values.numel() > 1 else 0.0
