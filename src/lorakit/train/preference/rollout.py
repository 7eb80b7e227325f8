"""GRPO's rollouts: completions sampled by lorakit's serving engine from the live model and adapter.

`LiveEngine` is `lorakit.serve.Engine` (continuous batching, per-request seeded sampling, KV caches kept per
row) over the model being trained, as it is: every row runs the model's active adapter, the one the optimizer
updates, through the ordinary forward. No registry, no per-row slots, no second copy of any weight and no
weight sync: a rollout after an optimizer step sees that step's weights because they are the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...serve.engine import Engine, Request


class LiveEngine(Engine):
    """`serve.Engine` whose forward is the model's own (its active adapters), not `per_row_adapters`.

    Requests must leave `adapter` None. The caller owns the model's mode: put it in eval mode (no dropout)
    around `generate` and keep the optimizer still meanwhile (the engine thread reads the weights)."""

    def _forward(self, adapters, cache, **inputs):
        return self.model(**inputs, **{self._cache_arg: cache}, use_cache=True)


@dataclass
class Rollout:
    """One sampled completion of prompt `prompt` (an index into the examples).

    ids: the completion's token ids, ending with the EOS token when it stopped at one (as TRL's completion
    mask counts it); truncated: it reached max_new_tokens instead.
    """

    prompt: int
    ids: list[int]
    text: str
    truncated: bool


def sample(
    engine: LiveEngine,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seeds: list[int] | None = None,
) -> list[Rollout]:
    """`n` completions of each prompt, in order: prompt 0's n, then prompt 1's, ... (groups adjacent).

    Args:
        temperature: 0 is greedy (then `n` is usually 1); seeds: one per completion (len(prompts) · n), each
            request's own generator, so the samples do not depend on how the engine batches them.
    Raises:
        RuntimeError: a request failed in the engine (its error).
    """
    total = len(prompts) * n
    if seeds is not None and len(seeds) != total:
        raise ValueError(f"{len(seeds)} seeds for {total} completions; expected one per completion")
    requests = [
        Request(list(p), max_tokens=max_new_tokens, temperature=temperature,
                seed=None if seeds is None else seeds[i * n + k])
        for i, p in enumerate(prompts) for k in range(n)
    ]  # fmt: skip
    engine.generate(requests)
    eos = _eos_id(engine)
    out = []
    for j, req in enumerate(requests):
        if req.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"rollout {j} failed in the engine: {req.finish_reason}: {req.error}")
        stopped = req.finish_reason == "stop"
        ids = list(req.output_ids) + ([eos] if stopped else [])
        out.append(Rollout(j // n, ids, req.text, not stopped))
    return out


def _eos_id(engine: Engine) -> int:
    """The EOS id appended to a completion that stopped: the tokenizer's, when the engine stops at it (the
    engine does not record which of several EOS ids it met; chat models end a turn with the tokenizer's)."""
    tid = engine.tokenizer.eos_token_id
    if tid is not None and tid in engine.eos_ids:
        return int(tid)
    return min(engine.eos_ids) if engine.eos_ids else -1  # -1: never used (nothing stops at an EOS)


def draw_seeds(n: int) -> list[int]:
    """`n` request seeds from torch's global generator: a checkpoint saves that generator's state, so a resumed
    run draws the seeds, and samples the completions, the uninterrupted run would."""
    return torch.randint(0, 2**62, (n,), dtype=torch.int64).tolist()
