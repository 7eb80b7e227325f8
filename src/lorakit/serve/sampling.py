"""Choosing the next token (greedy, or temperature + top-p with a per-request generator) and turning a growing
list of token ids into text deltas that respect stop strings."""

from __future__ import annotations

import torch
from torch import Tensor


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from `logits` (V,).

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature), restricted to the smallest set of
    most likely tokens whose probability reaches `top_p`, sampled with `generator`: the request's own, so a seed
    gives the same tokens whatever else is in the batch.
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
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
