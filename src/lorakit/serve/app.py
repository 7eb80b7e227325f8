"""The OpenAI-compatible HTTP layer over an `Engine`: the app, its error handlers, and where the routes live.

- `http.Server`: the shared state, the API-key check, safe body reading (size and nesting limits);
- `routes`: /health, /metrics, /v1/models, POST / DELETE /v1/adapters;
- `generate`: /v1/completions and /v1/chat/completions (JSON answers and server-sent events).

Every error is answered in OpenAI's format ({"error": {"message", "type", "param", "code"}}), including
unexpected ones (500). With an API key, the interactive docs (/docs, /redoc, /openapi.json) are off: they
would describe the API to anyone who can reach the port, and a browser's docs page cannot send the key.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import engine as E
from .generate import add_generation_routes
from .http import Server
from .registry import AdapterRegistry
from .routes import add_adapter_routes, add_info_routes
from .schemas import APIError


def create_app(engine: E.Engine, registry: AdapterRegistry, base_name: str, api_key: str | None = None,
               max_tokens_cap: int = 1024, max_body_bytes: int = 8 << 20,
               start_engine: bool = True) -> FastAPI:  # fmt: skip
    """The FastAPI app. It starts `engine` on a thread when the server starts and stops it at shutdown.

    Args:
        start_engine: False when the caller runs the engine's loop itself (`lorakit serve` runs it on the main
            thread, `Engine.run`, and the server on another: `serve/commands.py`).
        api_key: require `Authorization: Bearer KEY` on /v1/ routes (and turn the docs pages off).
        max_tokens_cap: the largest `max_tokens` a request may ask for.
        max_body_bytes: request bodies above this are refused with a 413.
    """
    srv = Server(engine, registry, base_name, api_key, max_tokens_cap, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        if start_engine:
            engine.stop()

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key is not None else {}
    app = FastAPI(title="lorakit", lifespan=lifespan, **docs)
    app.state.metrics = srv.metrics
    add_error_handlers(app, srv)
    add_info_routes(app, srv)
    add_adapter_routes(app, srv)
    add_generation_routes(app, srv)
    return app


def add_error_handlers(app: FastAPI, srv: Server) -> None:
    """OpenAI-format answers for every error, and the request counter (by route template and status)."""

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")  # the path template, so adapter names do not multiply series
        srv.metrics.request(getattr(route, "path", "other"), response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err.errors()[:1])[:500]).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):  # a bug: still an OpenAI-format answer
        body = APIError(500, f"internal error: {type(err).__name__}: {str(err)[:300]}").body()
        return JSONResponse(body, status_code=500)
