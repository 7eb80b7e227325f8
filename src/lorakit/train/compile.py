"""`--compile`: torch.compile the model's transformer body for the training loop, and only for it."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def compiled(model: torch.nn.Module, on: bool):
    """`torch.compile` the transformer body of `model` in place (`Module.compile`) while inside, when `on`.

    The body (`model.base_model`, or the model itself when it has none) is what both loss paths call, so the
    padded and the packed micro-batches and the plain and chunked losses all run compiled; the output head
    and the loss stay eager, and so do evaluation and generation after training (the compiled call is dropped
    on exit). Compiled with dynamic shapes from the first call (`dynamic=True`): micro-batches of new lengths
    (and batch sizes other than 1) reuse the one graph instead of recompiling (a static first graph, then a
    dynamic one, was torch.compile's default). Packed micro-batches are one sequence each under the rows'
    compiled attention (`row_attention_compiled`, `packing.sequences`), so a run compiles once.
    Parameter names and state_dict keys are unchanged (in-place compile wraps only the call).
    """
    if not on:
        yield
        return
    body = getattr(model, "base_model", None)
    body = body if isinstance(body, torch.nn.Module) else model
    body.compile(dynamic=True)
    try:
        yield
    finally:
        body._compiled_call_impl = None
