"""Fast paths for the Lora layers, used automatically wherever they apply (no flag), tested against the plain
path (`functional.py`) in tests/test_fast_*.py. They receive tensors, never layers: which path applies is the
layer's decision (layer_paths.FastLinearPath.forward), the arithmetic is here, on functional.lora_into_.

- Training, one active adapter on an nn.Linear / GPT-2 Conv1D with a frozen float weight:
  `linear.LoraLinearFunction`, a hand-derived backward that keeps one x per input tensor, a uint8 dropout
  keep-mask instead of a dropped copy of x, and accumulates dx in place; the projections that read one x (q/k/v,
  gate/up) run as one call of it (`fused.FusedGroup`): one matmul of x with their stacked A. Where x's
  producer is recognised (an RMSNorm, act(gate) · up) x is not even saved: it is rebuilt in backward from the
  tensors the base keeps anyway (`recompute.py`; `set_recompute(model, False)` saves it instead).
- Inference (no gradient needed), any number of active adapters on a Linear-like layer, quantized bases
  included: the base output plus each adapter's in-place `add_` (variants.py; DoRA included).
- Per-row adapters (mixed batches, `per_row_adapters`): `rows.add_rows_`, from the slots written when
  adapters load (slots.py): one grouped pair (two bmm over the slots) at decode sizes, contiguous runs otherwise.
Everything else (several adapters or DoRA while training, trainable tokens while training, autocast, a
trainable or non-float base weight, Embedding, Conv2d) takes the plain path.

`plain_path()` switches the fast paths off inside a `with` block (for comparisons and debugging).
`offload_activations(model)` (offload.py) moves what autograd keeps to CPU memory during forward (GPU training).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .linear import lora_linear_train
from .offload import offload_activations
from .recompute import set_recompute

__all__ = ["enabled", "lora_linear_train", "offload_activations", "plain_path", "set_recompute"]

_state = threading.local()


@contextlib.contextmanager
def plain_path() -> Iterator[None]:
    """Inside, every Lora layer computes with the plain (reference) path of functional.py."""
    before = getattr(_state, "plain", False)
    _state.plain = True
    try:
        yield
    finally:
        _state.plain = before


def enabled() -> bool:
    return not getattr(_state, "plain", False)
