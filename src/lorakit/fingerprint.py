"""A cheap fingerprint of the base weights an adapter was trained on, to catch loading onto another base.

Per targeted module: its weight shape and a SHA-256 of an evenly strided sample of its values rounded to
bfloat16, so the same base in fp32, bf16 or on another device gives the same digest, while a different
checkpoint of the same architecture does not.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

SAMPLES = 4096


def weight_digest(weight: Tensor) -> str:
    """SHA-256 hex digest of `weight`'s shape and a strided sample of its values (bf16-rounded)."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES)
    sample = flat[::step][:SAMPLES]
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    if sample.is_floating_point():
        sample = sample.to(torch.bfloat16).to(torch.float32)
    h.update(sample.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def combine(digests: dict[str, str]) -> str:
    """One digest for a set of {module name: digest}, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()
