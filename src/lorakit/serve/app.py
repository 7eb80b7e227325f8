"""The OpenAI-compatible HTTP layer over an `Engine`: routes, errors in OpenAI's format, server-sent events.

Each completion becomes one engine `Request` per prompt; the engine thread reports text deltas and the end
through callbacks that hand them to this event loop (`call_soon_threadsafe`), so no route ever blocks on a
forward. Adapter loads and deletes run on the engine thread (`Engine.call`) between decode steps.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.io import AdapterFileError

from . import engine as E
from .metrics import Metrics
from .registry import AdapterAccessError, AdapterConflict, AdapterRegistry
from .schemas import AdapterBody, APIError, ChatBody, CompletionBody, parse


def create_app(engine: E.Engine, registry: AdapterRegistry, base_name: str, api_key: str | None = None,
               max_tokens_cap: int = 1024) -> FastAPI:  # fmt: skip
    """The FastAPI app. It starts `engine` when the server starts and stops it at shutdown."""
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.metrics = metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")  # the path template, so adapter names do not multiply series
        metrics.request(getattr(route, "path", "other"), response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err.errors()[:1])).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (expected 'Authorization: Bearer <key>')",
                           code="invalid_api_key")  # fmt: skip

    async def body_of(request: Request) -> object:
        authorize(request)
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})") from None

    def adapter_for(model: str) -> str | None:
        if model == base_name:
            return None
        if registry.is_known(model):
            return model
        raise APIError(
            404, f"the model {model!r} does not exist; see GET /v1/models", "model", "model_not_found"
        )

    def model_card(name: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": base_name,
                "parent": parent}  # fmt: skip

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base_name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics_text():
        gauges = {
            "lorakit_running_requests": ("Generations being decoded now.", engine.running),
            "lorakit_waiting_requests": ("Generations waiting for a batch slot.", engine.waiting),
            "lorakit_loaded_adapters": ("Adapters now loaded on the model.", len(registry.loaded())),
            "lorakit_known_adapters": ("Adapters the server can serve.", len(registry.names())),
            "lorakit_adapter_loads_total": ("Adapter loads so far.", registry.loads),
            "lorakit_adapter_evictions_total": ("Adapters unloaded to make room.", registry.evictions),
            "lorakit_decode_steps_total": ("Batched decode forwards.", engine.steps),
            "lorakit_decode_rows_total": ("Rows over all decode forwards (/ steps = mean batch).", engine.rows_stepped),
        }  # fmt: skip
        text = metrics.render(gauges, {"lorakit_adapter_loaded": registry.loaded()})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        cards = [model_card(base_name, None)] + [model_card(n, base_name) for n in registry.names()]
        return {"object": "list", "data": cards}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = parse(AdapterBody, await body_of(request))
        try:
            real = registry.confine(body.path, body.name)
            await asyncio.wrap_future(engine.call(lambda: registry.add(body.name, real)))
        except AdapterAccessError as err:
            raise APIError(403, str(err), "path") from None
        except FileNotFoundError as err:
            raise APIError(404, str(err), "path") from None
        except AdapterConflict as err:
            raise APIError(409, str(err), "name") from None
        except AdapterFileError as err:
            raise APIError(400, str(err), "path") from None
        return model_card(body.name, base_name)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        authorize(request)
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.remove(name)))
        except KeyError:
            raise APIError(404, f"no adapter named {name!r}", "name", "model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionBody, await body_of(request))
        adapter = adapter_for(body.model)
        prompts = [p if isinstance(p, list) else tokenize(p) for p in body.prompts()]
        return await generate(body, adapter, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse(ChatBody, await body_of(request))
        adapter = adapter_for(body.model)
        if not getattr(engine.tokenizer, "chat_template", None):
            raise APIError(400, f"the model {base_name!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        except Exception as err:  # the template's own error (e.g. roles out of order) is the user's to fix
            raise APIError(400, f"messages: the chat template failed: {err}", "messages") from None
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await generate(body, adapter, [list(ids)], chat=True)

    def tokenize(text: str) -> list[int]:
        return list(engine.tokenizer(text)["input_ids"])

    async def generate(body, adapter: str | None, prompts: list[list[int]], chat: bool):
        vocab = len(engine.tokenizer)
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt")
            if any(not 0 <= t < max(vocab, engine.model.config.vocab_size) for t in ids):
                raise APIError(400, "prompt: token ids outside the vocabulary", "prompt")
        if body.max_tokens is not None and body.max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens={body.max_tokens} is over this server's cap of {max_tokens_cap}",
                           "max_tokens")  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        for ids in prompts:
            # Default: the rest of the context (chat) or OpenAI's 16 (completions), within the cap.
            room = engine.max_len - len(ids)
            max_tokens = body.max_tokens or min(max_tokens_cap, room if chat else 16)
            try:
                engine.check(len(ids), max_tokens)
            except ValueError as err:
                raise APIError(
                    400, str(err), "messages" if chat else "prompt", "context_length_exceeded"
                ) from None
            reqs.append(E.Request(
                list(ids), adapter, max_tokens, 1.0 if body.temperature is None else body.temperature,
                1.0 if body.top_p is None else body.top_p, body.seed, body.stops(), body.ignore_eos,
                on_delta=lambda r, d: post(loop, events, (r, d)),
                on_done=lambda r: done(r, loop, events),
            ))  # fmt: skip
        try:
            for r in reqs:
                engine.submit(r)
        except KeyError:  # deleted between the lookup and now
            for r in reqs:
                engine.cancel(r)
            raise APIError(
                404, f"the model {body.model!r} does not exist", "model", "model_not_found"
            ) from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": body.model}  # fmt: skip
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                sse(reqs, events, meta, chat, include_usage), media_type="text/event-stream"
            )
        try:
            finished = 0
            while finished < len(reqs):
                _, delta = await events.get()
                finished += delta is None
        finally:
            for r in reqs:
                if not r.done.is_set():
                    engine.cancel(r)
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        if failed is not None and (failed.error or "").startswith("KeyError"):  # deleted while it waited
            raise APIError(404, f"the model {body.model!r} does not exist", "model", "model_not_found")
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}")
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
             "finish_reason": r.finish_reason} if chat else
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(reqs)
        ]  # fmt: skip
        obj = "chat.completion" if chat else "text_completion"
        return {**meta, "object": obj, "choices": choices, "usage": usage(reqs)}

    def done(r: E.Request, loop, events: asyncio.Queue) -> None:
        metrics.completion(len(r.prompt_ids), r.completion_tokens, (r.finished or 0) - r.submitted)
        post(loop, events, (r, None))

    async def sse(reqs, events, meta, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        index = {r.id: i for i, r in enumerate(reqs)}
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

        finished = 0
        try:
            if chat:
                for i in range(len(reqs)):
                    yield chunk(i, None, None, role=True)
            while finished < len(reqs):
                r, delta = await events.get()
                if delta is not None:
                    yield chunk(index[r.id], delta, None)
                    continue
                finished += 1
                if r.finish_reason == "error":
                    yield f"data: {json.dumps(APIError(500, f'generation failed: {r.error}').body())}\n\n"
                    continue
                yield chunk(index[r.id], None, r.finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': usage(reqs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:  # the client went away: stop decoding for it
                if not r.done.is_set():
                    engine.cancel(r)

    return app


def post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item: tuple) -> None:
    """Hand an engine event to the request's event loop (from the engine thread)."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, item)
    except RuntimeError:  # the loop has closed (server shutting down): nobody is listening any more
        pass


def usage(reqs: list[E.Request]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in reqs)
    completion = sum(r.completion_tokens for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
