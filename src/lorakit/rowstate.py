"""The per-row adapter mapping of the current step: ONE object, set for a `with` block by `per_row_adapters`
(slots.py) and read by every layer, instead of a plan stamped on each layer.

A context variable, so two threads (or asyncio tasks) serving different batches never see each other's
mapping. This module imports nothing of lorakit, so layers, slots and fast paths can all read it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lorakit_row_mapping", default=None)


def current():
    """The mapping of the current step (a rowmapping.RowMapping), or None outside `per_row_adapters`."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(mapping) -> Iterator[None]:
    """Inside, `current()` is `mapping`; the previous one is restored on exit (contexts nest)."""
    token = _CURRENT.set(mapping)
    try:
        yield
    finally:
        _CURRENT.reset(token)
