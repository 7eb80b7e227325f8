"""Padding-free packed micro-batches: rows concatenated into sequences, each row attending only to itself.

A padded micro-batch of `batch_size` rows is as wide as its longest row, so on data with mixed row lengths most
of its tokens can be padding. Packed, an optimizer step's rows are put into *bins* (sequences) by first-fit
decreasing, and bins make micro-batches of at most batch_size x max_len tokens (the padded path's worst case,
so memory stays bounded as before); `plan` picks the bin width (from the longest row up to that budget) whose
layout costs least, counting tokens and, per token, the attention over its sequence. Inside a bin:

- `position_ids` restart at 0 for each row, and no `attention_mask` is passed: transformers (>= 4.5x) then
  builds a block-diagonal causal mask from the position ids (sdpa / eager / flex; flash attention uses its
  variable-length kernel), so a row attends to exactly the tokens it would attend to alone;
- the label of each row's first token is -100, so no loss is taken across a row boundary (the token before it
  belongs to another row); a padded row never predicts its first token either, so each row carries exactly the
  loss tokens it carries padded;
- the few pad tokens that end a bin (bins of one micro-batch share a width) form a segment of their own
  (positions from 0), after every real token: causal attention keeps them out of every real token's view.

Whether a model honours packed position ids is checked, not assumed (`check`): some families build their mask
or positions from `attention_mask` alone (OPT, Bloom, MPT) and would let packed rows see each other.

Packing never changes which rows an optimizer step sees (the step's rows are packed among themselves), only how
they are grouped into micro-batches; the loss of a step is normalised by its loss tokens, so the gradient is
that of the padded path up to float rounding. With LoRA dropout on, the dropout masks are drawn over other
tensor shapes, so packed and padded runs differ by the random draws (each is exact and resumable on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths` grouped so that each group's lengths sum to <= capacity.

    A length above `capacity` gets a bin of its own. Deterministic: ties are broken by index, and each bin lists
    its indices in increasing order. Bins come out fullest first (in the order they were opened).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, left in enumerate(room):
            if n <= left:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return [sorted(b) for b in bins]


def plan(
    lengths: list[int], capacity: int, per_batch: int, attention: float = 0.0, widest: int | None = None
) -> list[list[list[int]]]:
    """Micro-batches of bins (lists of indices into `lengths`) within a budget of per_batch x capacity tokens.

    A micro-batch of k bins computes k x (its widest bin) tokens, never more than the budget (what a padded
    micro-batch of `per_batch` rows of `capacity` tokens holds at most). Wide bins pack tightly but make
    attention dearer (a masked sequence of width w costs ~w per token in attention) and leave the less full
    bins of a micro-batch padded; so this tries first-fit decreasing bins of widths from the longest row up to
    the budget, each with as many bins per micro-batch as the budget allows, and the rows one per bin in order
    (what padding computes), and keeps the cheapest: sum over micro-batches of k x w x (1 + attention x w),
    then the fewest micro-batches. With attention=0 it computes the fewest tokens, never more than padding.

    Args:
        attention: the attention cost of one token per token of sequence width, relative to the rest of the
            model's per-token cost (~ 1 / (6 x hidden size) for a transformer block); 0 counts tokens only
            (attention computed row by row, `row_attention`, costs the same in any bin).
        widest: no bin wider than this (nor than the longest row needs); None: up to the budget.
    """
    if per_batch < 1 or capacity < 1:
        raise ValueError(f"per_batch and capacity must be >= 1, got {per_batch}, {capacity}")
    if not lengths:
        return []
    longest, budget = max(lengths), per_batch * max(capacity, max(lengths))
    top = budget if widest is None else max(longest, min(budget, widest))
    widths = {min(top, max(longest, round(longest * f))) for f in _WIDTHS} | {min(top, capacity)}
    layouts = [([[i] for i in range(len(lengths))], per_batch)]
    layouts += [(pack_bins(lengths, w), max(1, budget // w)) for w in sorted(widths)]

    def groups(layout):
        bins, k = layout
        return [bins[i : i + k] for i in range(0, len(bins), k)]

    def cost(layout) -> tuple[float, int]:
        parts = groups(layout)
        widest = [max(sum(lengths[i] for i in b) for b in g) for g in parts]
        return sum(len(g) * w * (1.0 + attention * w) for g, w in zip(parts, widest)), len(parts)

    return groups(min(layouts, key=cost))


def sequences(lengths: list[int], budget: int) -> list[list[list[int]]]:
    """Micro-batches of one bin each (`plan`'s layout shape): first-fit decreasing bins of at most `budget`
    tokens, each its own micro-batch of exactly its rows' tokens (no padding computed). For the rows' attention
    under torch.compile: every micro-batch is then (1, its length), so one graph with a dynamic length serves
    the whole run, and a row's attention costs the same in any bin."""
    return [[b] for b in pack_bins(lengths, budget)]


_WIDTHS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # bin widths tried, x the longest row


def collate_packed(bins: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """One packed micro-batch from bins of examples (objects with `input_ids` and `labels`).

    Returns:
        {"input_ids", "labels", "position_ids"}: LongTensors of shape (bins, widest bin). No attention_mask:
        its absence is what makes transformers read the row boundaries from position_ids. labels are -100 on
        each row's first token and on pads.
    """
    if not bins or not all(bins):
        raise ValueError("collate_packed needs at least one bin and no empty bin")
    width = max(sum(len(ex.input_ids) for ex in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for ex in b:
            n = len(ex.input_ids)
            ids[r, at : at + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(ex.labels[1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        # The pads: a segment of their own, after every real token.
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@dataclass
class Stats:
    """Token counts of the micro-batches a run computed, and of the padded ones it would have computed."""

    real: int = 0  # tokens of the rows
    computed: int = 0  # tokens in the micro-batch tensors (real + pads)
    padded: int = 0  # tokens padded micro-batches of `batch_size` rows would hold
    rows: int = 0
    sequences: int = 0  # bins (packed) or rows (padded)
    micro_batches: int = 0

    def add(self, other: Stats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def efficiency(self) -> float:
        return self.real / self.computed if self.computed else 1.0

    def padded_efficiency(self) -> float:
        return self.real / self.padded if self.padded else 1.0

    def line(self, packed: bool) -> str:
        """One line for the run log."""
        if not packed:
            return f"padding: {self.efficiency():.1%} of the tokens computed are real (rows padded per micro-batch)"
        return (
            f"packing: {self.rows} rows in {self.sequences} sequences ({self.rows / max(1, self.sequences):.1f} "
            f"rows each), {self.micro_batches} micro-batches; {self.efficiency():.1%} of the tokens computed "
            f"are real (padded micro-batches: {self.padded_efficiency():.1%})"
        )

    def to_dict(self, packed: bool) -> dict:
        return {
            "packed": packed, "rows": self.rows, "sequences": self.sequences, "micro_batches": self.micro_batches,
            "real_tokens": self.real, "computed_tokens": self.computed, "padded_tokens": self.padded,
            "efficiency": round(self.efficiency(), 4), "padded_efficiency": round(self.padded_efficiency(), 4),
        }  # fmt: skip


def padded_tokens(lengths: list[int], per_batch: int) -> int:
    """Tokens of right-padded micro-batches of `per_batch` consecutive rows of these lengths."""
    return sum(
        len(lengths[i : i + per_batch]) * max(lengths[i : i + per_batch])
        for i in range(0, len(lengths), per_batch)
    )


@torch.no_grad()
def check(model: torch.nn.Module) -> str:
    """'' if `model` computes packed rows exactly as it computes each row alone; otherwise the reason why not.

    Three forwards of a 12-token probe (eval mode, then the mode is restored): row b alone; rows a and b packed
    (position ids restarting, no attention mask); and a, b with position ids restarting but a full attention mask,
    i.e. b allowed to see a. Packing is exact when b's packed logits are much closer to b alone than to the
    leaky version (a model that ignores packed position ids gives the leaky logits exactly). The comparison is
    relative, so it holds in bf16 / fp16 as well as in fp32.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    name = type(model).__name__
    if not vocab:
        return f"{name} has no token embedding to probe"
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a = torch.randint(min(3, vocab - 1), vocab, (7,), generator=g)
    b = torch.randint(min(3, vocab - 1), vocab, (5,), generator=g)
    both = torch.cat([a, b])[None].to(device)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=b[None].to(device), use_cache=False).logits[0].float()
        packed = model(input_ids=both, position_ids=positions, use_cache=False).logits[0, 7:].float()
        full = torch.ones_like(both)
        leaky = model(input_ids=both, attention_mask=full, position_ids=positions, use_cache=False).logits
    except Exception as err:  # a model without position_ids, or one that rejects them
        return f"{name} cannot run a packed probe ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    exact = float((packed - alone).abs().max())
    leak = float((packed - leaky[0, 7:].float()).abs().max())
    if exact == 0.0 or exact < 0.1 * leak:
        return ""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return (
        f"{name} (attention {impl}) does not keep packed rows apart: a packed row's logits differ from the row "
        f"alone by {exact:.3g} (it attends across the row boundary)"
    )


def choose(model: torch.nn.Module, option: bool | None, say) -> bool:
    """Whether a run packs. option False: no. True: yes, or ValueError when the model cannot keep packed rows
    apart (`check`). None (the default): when it can; otherwise `say` is told why and the run pads."""
    if option is False:
        return False
    why = check(model)
    if why and option:
        raise ValueError(f"--packing: {why}; train without --packing (each micro-batch is then padded)")
    if why:
        say(f"packing off: {why}; each micro-batch is padded")
    return not why
