"""Choosing the next token (greedy, or temperature + top-p with a per-request generator) and turning a growing
list of token ids into text deltas that respect stop strings."""

from __future__ import annotations

import torch
from torch import Tensor

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def check_sampling(temperature: float, top_p: float, seed: int | None, max_tokens: int) -> None:
    """Raises ValueError naming the first parameter `next_token` (or the engine) cannot use as given."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ValueError(f"temperature={temperature!r}: expected a finite number in [0, 2]")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1]")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX
    ):
        raise ValueError(f"seed={seed!r}: expected an integer in [-2**63, 2**64 - 1]")


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from `logits` (V,).

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature), restricted to the smallest set of
    most likely tokens whose probability reaches `top_p`, sampled with `generator`: the request's own, so a seed
    gives the same tokens whatever else is in the batch. Any temperature > 0 is exact, however small: the
    logits are shifted so their maximum is 0 and divided in float64, so 1e-40 gives 0 and -inf, never
    inf/inf (which would be NaN). Raises RuntimeError for NaN logits.
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    z = logits.double()
    probs = torch.softmax((z - z.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep a token when the mass before it is still below top_p (so the most likely one always stays).
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextStream:
    """The text of generated ids, released in deltas that are final.

    A delta never ends inside an incomplete UTF-8 character (the decoder shows U+FFFD there) nor with text that
    could still become a stop string. `stopped` turns True once a stop string appears; the text is cut before it.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the final text so far (released)
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly released text (possibly "")."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for s in self.stop if (i := full.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(full[:cut])
        ready = full.rstrip("\ufffd")
        hold = max((k for s in self.stop for k in range(1, len(s)) if ready.endswith(s[:k])), default=0)
        return self._release(ready[: len(ready) - hold])

    def finish(self) -> str:
        """Release whatever was held back (the request ended without a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        # Released text is final: a decoder that rewrites earlier characters only gets its new tail out.
        delta = upto[len(self.text) :]
        self.text += delta
        return delta
