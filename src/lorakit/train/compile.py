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
    on exit). Shapes change between micro-batches: torch.compile marks them dynamic after the first recompile.
    Parameter names and state_dict keys are unchanged (in-place compile wraps only the call).
    """
    if not on:
        yield
        return
    body = getattr(model, "base_model", None)
    body = body if isinstance(body, torch.nn.Module) else model
    body.compile()
    try:
        yield
    finally:
        body._compiled_call_impl = None
