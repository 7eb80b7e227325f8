"""The routes that do not generate: /health, /metrics, /v1/models, and adapter loading and deleting."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from lorakit.io import AdapterFileError

from .http import Server
from .registry import AdapterAccessError, AdapterConflict, AdapterUnsupported
from .schemas import AdapterBody, APIError, parse


def add_info_routes(app: FastAPI, srv: Server) -> None:
    engine, registry = srv.engine, srv.registry

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.base_name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics_text():
        gauges = {
            "lorakit_running_requests": ("Generations being decoded now.", engine.running),
            "lorakit_waiting_requests": ("Generations waiting for a batch slot.", engine.waiting),
            "lorakit_loaded_adapters": ("Adapters now loaded on the model.", len(registry.loaded())),
            "lorakit_known_adapters": ("Adapters the server can serve.", len(registry.names())),
            "lorakit_pinned_adapters": ("Adapters held by running requests.", len(registry.pinned())),
            "lorakit_adapter_loads_total": ("Adapter loads so far.", registry.loads),
            "lorakit_adapter_evictions_total": ("Adapters unloaded to make room.", registry.evictions),
            "lorakit_adapter_disk_reads_total": ("Adapter directories read from disk.", registry.disk_reads),
            "lorakit_decode_steps_total": ("Batched decode forwards.", engine.steps),
            "lorakit_decode_rows_total": ("Rows over all decode forwards (/ steps = mean batch).", engine.rows_stepped),
        }  # fmt: skip
        text = srv.metrics.render(gauges, {"lorakit_adapter_loaded": registry.loaded()})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        srv.authorize(request)
        cards = [srv.model_card(srv.base_name, None)]
        return {
            "object": "list",
            "data": cards + [srv.model_card(n, srv.base_name) for n in registry.names()],
        }


def add_adapter_routes(app: FastAPI, srv: Server) -> None:
    engine, registry = srv.engine, srv.registry

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = parse(AdapterBody, await srv.body(request))
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.add(body.name, body.path, confined=True)))
        except AdapterAccessError as err:
            raise APIError(403, str(err), "path") from None
        except FileNotFoundError as err:
            raise APIError(404, str(err), "path") from None
        except AdapterConflict as err:
            raise APIError(409, str(err), "name") from None
        except (AdapterUnsupported, AdapterFileError) as err:
            raise APIError(400, str(err), "path") from None
        except OSError as err:  # e.g. a directory the server may not read
            raise APIError(
                400, f"adapter path {body.path[:200]!r}: cannot be read ({err.strerror})", "path"
            ) from None
        except ValueError as err:
            raise APIError(400, str(err), "name") from None
        return srv.model_card(body.name, srv.base_name)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        srv.authorize(request)
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.remove(name)))
        except KeyError:
            raise APIError(404, f"no adapter named {name[:200]!r}", "name", "model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}
