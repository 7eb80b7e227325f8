"""The data order of a run: a pure function of (seed, step).

Each epoch is a seeded permutation of the rows, and step s takes rows [s·G, (s+1)·G) of the concatenated
epochs, G = batch_size · grad_accum · processes. So a resumed or multi-process run sees exactly the rows a
single uninterrupted run sees, and a checkpoint only needs the step.
"""

from __future__ import annotations

import functools

import torch


def step_rows(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: rows [step·G, (step+1)·G) of the seeded epoch permutations."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, j = divmod(i, n)
        out.append(_permutation(n, seed, epoch)[j])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())
