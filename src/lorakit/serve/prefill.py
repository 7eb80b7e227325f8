"""Prefill, step 3 of the engine's loop (`engine.Engine`, whose module docstring has the whole loop).

Within a budget of `prefill_chunk` prompt tokens per loop: admitted prompts that fit together go in one forward
(left-padded, masked, position ids counted from each row's first real token); a longer prompt goes alone, one
chunk per loop, into a cache of its own, so running rows keep decoding between its chunks. A prefilled row
samples its first token and joins the batch's cache (`BatchCache.add` / `extend`). A prompt that breaks a
shared forward is retried alone, so only it fails.

`Prefill` is a mixin of `Engine`: it reads the engine's `_prefilling` rows, `prefill_chunk`, `pad_id`,
`device`, `model` and `_cache`, and calls its `_forward`, `_advance`, `_last_logits`, `_slot_order` and `_finish`.
"""

from __future__ import annotations

import time

import torch

from .kvcache import new_cache, select_rows


def describe(err: BaseException) -> str:
    """A request's `error` text for an exception."""
    return f"{type(err).__name__}: {err}"


class Prefill:
    """The engine's prefill methods (see the module docstring); they run on the engine thread."""

    def _prefill_some(self) -> None:
        """One prefill forward of at most `prefill_chunk` prompt tokens (see the module docstring)."""
        for row in [r for r in self._prefilling if r.req.cancelled]:
            self._prefilling.remove(row)
            self._finish(row, "cancelled")
        if not self._prefilling:
            return
        first = self._prefilling[0]
        if first.prefilled or len(first.req.prompt_ids) > self.prefill_chunk:
            return self._prefill_chunk(first)
        group, budget = [], self.prefill_chunk
        for row in self._prefilling:  # in arrival order, while they fit
            if row.prefilled or len(row.req.prompt_ids) > budget:
                break
            group.append(row)
            budget -= len(row.req.prompt_ids)
        self._prefill_group(group)

    def _prefill_chunk(self, row) -> None:
        """The next chunk of a long prompt, alone (batch 1, its own cache); the row joins after the last."""
        req = row.req
        try:
            row.cache = row.cache or new_cache(self.model.config)
            end = min(row.prefilled + self.prefill_chunk, len(req.prompt_ids))
            ids = torch.tensor([req.prompt_ids[row.prefilled : end]], device=self.device)
            out = self._forward([req.adapter], row.cache, input_ids=ids, **self._last_logits())
            self.prefills, self.prefill_rows = self.prefills + 1, self.prefill_rows + 1
            row.prefilled = end
            if end == len(req.prompt_ids):
                self._prefilling.remove(row)
                cache, row.cache = row.cache, None
                if self._first_token(row, out.logits[0, -1]):
                    self._cache.add(cache, end)
                    self._rows.append(row)
        except Exception as err:  # this request alone fails; the batch never saw it
            if row in self._prefilling:
                self._prefilling.remove(row)
            row.cache = None
            self._finish(row, "error", describe(err))

    def _prefill_group(self, group: list) -> None:
        """Whole prompts in one forward (left-padded and masked, in slot order as the batch); the rows join
        the batch."""
        group = [group[i] for i in self._slot_order(group)]
        lengths = [len(r.req.prompt_ids) for r in group]
        width = max(lengths)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, width - lengths[i] :] = torch.tensor(r.req.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            cache = new_cache(self.model.config)
            inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            inputs = (
                {k: v.to(self.device) for k, v in inputs.items()}
                if len(group) > 1
                else {"input_ids": ids.to(self.device)}
            )
            out = self._forward([r.req.adapter for r in group], cache, **inputs, **self._last_logits())
        except Exception as err:
            if len(group) > 1:  # which prompt broke it? each alone: only that one fails
                for r in group:
                    self._prefill_group([r])
                return
            self._prefilling.remove(group[0])
            return self._finish(group[0], "error", describe(err))
        self.prefills, self.prefill_rows = self.prefills + 1, self.prefill_rows + len(group)
        keep = []
        for i, r in enumerate(group):
            self._prefilling.remove(r)
            try:
                if self._first_token(r, out.logits[i, -1]):
                    keep.append(i)
            except Exception as err:  # sampling, decoding or a callback failed for this row: it alone ends
                self._finish(r, "error", describe(err))
        if keep:
            self._cache.extend(select_rows(cache, keep), [lengths[i] for i in keep])
            self._rows.extend(group[i] for i in keep)

    def _first_token(self, row, logits: torch.Tensor) -> bool:
        row.req.first_token = time.perf_counter()
        return self._advance(row, logits)
