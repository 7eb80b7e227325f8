"""Serving one base model with many adapters: a continuous-batching engine and an OpenAI-compatible server.

The engine (`Engine`, `Request`) and the adapter registry are plain library code; the HTTP layer
(`lorakit.serve.app`) needs fastapi and uvicorn (`pip install 'lorakit[serve]'`).
"""

from .._lazy import attach

attach(
    __name__,
    {"Engine": "engine", "Request": "engine", **dict.fromkeys(
        ("AdapterAccessError", "AdapterConflict", "AdapterRegistry", "AdapterUnsupported"), "registry")},
)  # fmt: skip

__all__ = [
    "AdapterAccessError",
    "AdapterConflict",
    "AdapterRegistry",
    "AdapterUnsupported",
    "Engine",
    "Request",
]
