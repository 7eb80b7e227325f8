"""Activations kept for backward moved to CPU memory during forward and brought back in backward (GPU training).

`offload_activations(model)` is a `torch.autograd.graph.saved_tensors_hooks` context: run the forward (and
the loss) inside it, the backward anywhere. Unlike torch's `save_on_cpu`:
- the model's parameters stay where they are: every frozen Linear keeps its weight for dx, and copying the
  weights out and back each step would move the whole model twice;
- tensors under `min_bytes` stay (norm statistics, small masks: the copy costs more than it frees);
- a tensor saved by several nodes (the residual stream h, kept by the RMSNorm's pow and its mul) is copied once.
Values come back bit for bit, so gradients equal those of training without it. On CUDA the copies go to pinned
memory and come back with non_blocking on the current stream. Inside, LoRA layers save their input instead of
rebuilding it (fast/recompute.py steps aside under saved-tensor hooks), and it is offloaded like the rest.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn


class offload_activations(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context, like torch's)
    """with offload_activations(model): loss = ...; then loss.backward() outside.

    Args: model (its parameters are never offloaded; None: only tensors of class nn.Parameter are kept),
    min_bytes (smaller tensors stay), device (where copies go, "cpu"). `stats` counts what was offloaded:
    {"tensors", "bytes"} (distinct tensors) and "kept" (tensors left in place).
    """

    def __init__(self, model: nn.Module | None = None, min_bytes: int = 1 << 16, device: str = "cpu") -> None:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.stats = {"tensors": 0, "bytes": 0, "kept": 0}
        self._seen: dict[int, tuple[weakref.ref, Tensor]] = {}
        target = torch.device(device)

        def pack(t: Tensor):
            nbytes = t.numel() * t.element_size()
            if (
                nbytes < min_bytes
                or isinstance(t, nn.Parameter)
                or t.untyped_storage().data_ptr() in params
                or t.layout != torch.strided
            ):
                self.stats["kept"] += 1
                return t
            hit = self._seen.get(id(t))
            if hit is not None and hit[0]() is t:  # the same live tensor saved again: one copy
                return t.device, hit[1]
            pin = t.is_cuda and target.type == "cpu"
            copy = torch.empty(t.shape, dtype=t.dtype, device=target, pin_memory=pin)
            copy.copy_(t)
            self._seen[id(t)] = (weakref.ref(t), copy)
            self.stats["tensors"] += 1
            self.stats["bytes"] += nbytes
            return t.device, copy

        def unpack(packed):
            if isinstance(packed, Tensor):
                return packed
            device, copy = packed
            return copy.to(device, non_blocking=copy.is_pinned())

        super().__init__(pack, unpack)

    def __exit__(self, *exc) -> None:
        self._seen.clear()  # the copies live on in the graph, as long as it needs them
        super().__exit__(*exc)
