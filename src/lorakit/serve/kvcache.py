"""The KV cache of a decode batch whose rows come and go (continuous batching).

Waiting requests are prefilled together into one `DynamicCache` (prompts left-padded, padding masked), or a long
prompt alone, chunk by chunk. The prefilled rows then join the running batch: their keys and values are
left-padded with zeros to the batch's width (or the batch is left-padded to theirs) and concatenated on the
batch dimension. Every decode step appends one column for all
rows, so the rows stay right-aligned; the attention mask hides each row's padding columns and `position_ids`
give each row its own positions, so a row computes what it would compute alone. Finished rows are dropped and
padding columns no row needs any more are trimmed from the left.

Only full-attention `DynamicLayer` caches are supported (Llama, Qwen2, GPT-2, ... without sliding windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


def new_cache(config) -> DynamicCache:
    """An empty cache for one request. Raises ValueError for a model whose cache layers are not full attention."""
    cache = DynamicCache(config=config)
    bad = [type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer]
    if bad:
        raise ValueError(
            f"serving needs full-attention KV caches; this model uses {sorted(set(bad))} (sliding window?)"
        )
    return cache


def cache_argument(model) -> str:
    """The name under which `model`'s forward takes a KV cache: `cache` (transformers 5.x, where
    `past_key_values` is deprecated and goes in 5.40) or `past_key_values` (the releases before the rename)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


class BatchCache:
    """The batch's cache (`cache`, rows left-padded to `width` columns) and each row's real length.

    Row i's real tokens are the last `lengths[i]` columns; the columns before them are padding.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []
        self.width = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, row: DynamicCache, length: int) -> None:
        """Append a prefilled batch-1 cache holding `length` tokens as the last row."""
        self.extend(row, [length])

    def extend(self, rows: DynamicCache, lengths: list[int]) -> None:
        """Append the rows of a prefilled, left-padded cache: row i's real tokens are its last lengths[i]
        columns (a batch-1 cache without padding is the case lengths == [its width])."""
        trim = rows.layers[0].keys.shape[2] - max(lengths)  # leading columns that are padding in every row
        width = max(lengths)
        if self.cache is None or not self.lengths:
            for layer in rows.layers:
                layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
            self.cache, self.lengths, self.width = rows, list(lengths), width
            return
        grow = max(width - self.width, 0)
        for mine, theirs in zip(self.cache.layers, rows.layers):
            pad = self.width + grow - width
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys[:, :, trim:], pad)])
            mine.values = torch.cat(
                [_pad_left(mine.values, grow), _pad_left(theirs.values[:, :, trim:], pad)]
            )
        self.width += grow
        self.lengths.extend(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current batch, in the new order) and trim shared padding."""
        if not rows:
            self.cache, self.lengths, self.width = None, [], 0
            return
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        self.lengths = [self.lengths[i] for i in rows]
        cut = self.width - max(self.lengths)  # leading columns that are padding in every row
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]
        self.width -= cut

    def step_inputs(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(attention_mask (B, width + 1), position_ids (B, 1)) for a forward of one new token per row."""
        lengths = torch.tensor(self.lengths, device=device)
        columns = torch.arange(self.width + 1, device=device)
        mask = (columns.unsqueeze(0) >= (self.width - lengths).unsqueeze(1)).long()
        return mask, lengths.unsqueeze(1)

    def advance(self) -> None:
        """Record that the forward appended one column to every row."""
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]


def select_rows(cache: DynamicCache, rows: list[int]) -> DynamicCache:
    """Keep only batch rows `rows` of `cache` (in that order), in place; returns it."""
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    return cache


def _pad_left(t: Tensor, n: int) -> Tensor:
    # (B, H, T, D) -> (B, H, n + T, D) with zeros in front; masked out, so their value never matters.
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t
