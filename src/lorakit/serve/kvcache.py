"""The KV cache of a decode batch whose rows come and go (continuous batching).

Waiting requests are prefilled together into one `DynamicCache` (prompts left-padded, padding masked), or a long
prompt alone, chunk by chunk. The prefilled rows then join the running batch: their keys and values are
left-padded with zeros to the batch's width (or the batch is left-padded to theirs) and concatenated on the
batch dimension. Every decode step appends one column for all
rows, so the rows stay right-aligned; the attention mask hides each row's padding columns and `position_ids`
give each row its own positions, so a row computes what it would compute alone. Finished rows are dropped and
padding columns no row needs any more are trimmed from the left.

The batch's layers keep their keys and values as views into buffers with room for more columns
(`GrowingLayer`): a decode step writes its one column in place. `DynamicLayer.update` concatenates, which
copies the whole cache every step and every layer (16 rows × 3 heads × 64 dims × 30 layers, one thread:
5.6 ms a step at 64 columns, 70 ms at 128 when each copy is a fresh mmap; in place: 2.7 / 3.1 ms). The
buffers are rebuilt only when rows join or leave (which copied the cache before too) or the room runs out.

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


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose `keys` / `values` (B, H, T, D) are the first T columns of buffers
    (B, H, T + room, D): `update` writes the new columns into the room instead of concatenating.

    Args:
        keys, values: (B, H, T, D) the layer's cache so far (copied into the new buffers).
        room: columns to leave free; when an update needs more, the buffers are reallocated with room for
            as many columns again as they then hold (amortised O(1) copies per column).
    """

    def __init__(self, keys: Tensor, values: Tensor, room: int) -> None:
        super().__init__()
        self._grow(keys, values, room)

    def _grow(self, keys: Tensor, values: Tensor, room: int) -> None:
        b, h, t, _ = keys.shape
        self._keys = keys.new_empty(b, h, t + room, keys.shape[3])
        self._values = values.new_empty(b, h, t + room, values.shape[3])
        self._keys[:, :, :t].copy_(keys)
        self._values[:, :, :t].copy_(values)
        self.keys, self.values = self._keys[:, :, :t], self._values[:, :, :t]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append (B, H, n, D) keys and values; returns the layer's (B, H, T + n, D) views."""
        t, n = self.keys.shape[2], key_states.shape[2]
        if t + n > self._keys.shape[2]:
            self._grow(self.keys, self.values, max(t + n, ROOM))
        self._keys[:, :, t : t + n].copy_(key_states)
        self._values[:, :, t : t + n].copy_(value_states)
        self.keys, self.values = self._keys[:, :, : t + n], self._values[:, :, : t + n]
        return self.keys, self.values


ROOM = 32  # decode steps a rebuilt batch cache takes without reallocating (rows join or leave more often)


def _growing(cache: DynamicCache, keys: list[Tensor], values: list[Tensor]) -> DynamicCache:
    """`cache` with its layers replaced by GrowingLayers holding `keys` / `values` (one per layer)."""
    cache.layers = [GrowingLayer(k, v, ROOM) for k, v in zip(keys, values)]
    return cache


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
            keys = [layer.keys[:, :, trim:] for layer in rows.layers]
            values = [layer.values[:, :, trim:] for layer in rows.layers]
            self.cache, self.lengths, self.width = _growing(rows, keys, values), list(lengths), width
            return
        grow = max(width - self.width, 0)
        pad = self.width + grow - width
        keys, values = [], []
        for mine, theirs in zip(self.cache.layers, rows.layers):
            keys.append(torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys[:, :, trim:], pad)]))
            values.append(
                torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values[:, :, trim:], pad)])
            )
        _growing(self.cache, keys, values)
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
        keys = [layer.keys[:, :, cut:].index_select(0, index) for layer in self.cache.layers]
        values = [layer.values[:, :, cut:].index_select(0, index) for layer in self.cache.layers]
        _growing(self.cache, keys, values)
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
