"""What every route shares: the engine, the registry, the key check, and reading a request body safely.

A body is read with a size limit (413 beyond it, whether or not Content-Length says so), parsed as JSON with
a nesting limit (a body nested 100 000 deep is a 400, not a RecursionError) and only then validated.
"""

from __future__ import annotations

import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from . import engine as E
from .metrics import Metrics
from .registry import AdapterRegistry
from .schemas import APIError

MAX_DEPTH = 32  # JSON nesting: an OpenAI body needs about 5


@dataclass
class Server:
    """The state the routes share (one per app)."""

    engine: E.Engine
    registry: AdapterRegistry
    base_name: str
    api_key: str | None = None
    max_tokens_cap: int = 1024
    max_body_bytes: int = 8 << 20
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "lorakit-tokenize")
    )
    token_chars: int = 0  # the longest token's text, in characters (computed from the vocabulary)

    def __post_init__(self) -> None:
        if not self.token_chars:
            vocab = self.engine.tokenizer.get_vocab()
            self.token_chars = max((len(t) for t in vocab), default=1) or 1

    def authorize(self, request: Request) -> None:
        """Raises APIError(401) unless the request carries the API key (when the server has one)."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (expected 'Authorization: Bearer <key>')",
                           code="invalid_api_key")  # fmt: skip

    async def body(self, request: Request) -> object:
        """The authorized request's JSON body. Raises APIError: 401, 413 (too large), 400 (not JSON, too deep)."""
        self.authorize(request)
        raw = await read_limited(request, self.max_body_bytes)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({str(err)[:200]})") from None
        except RecursionError:
            data = None
        if data is None and raw.strip() != b"null" or not depth_within(data, MAX_DEPTH):
            raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
        return data

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base). Raises APIError(404) for an unknown one."""
        if model == self.base_name:
            return None
        if self.registry.is_known(model):
            return model
        raise APIError(
            404, f"the model {model[:200]!r} does not exist; see GET /v1/models", "model", "model_not_found"
        )

    def model_card(self, name: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lorakit",
                "root": self.base_name, "parent": parent}  # fmt: skip


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes. Raises APIError(413) beyond it (checked while reading)."""
    too_big = APIError(413, f"the request body is over this server's limit of {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def depth_within(data: object, limit: int) -> bool:
    """Whether nested lists and dicts in `data` go at most `limit` levels deep (iterative: no recursion)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            stack.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return True
