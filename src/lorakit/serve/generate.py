"""/v1/completions and /v1/chat/completions: prompts -> engine requests -> one JSON answer or server-sent events.

Each prompt becomes one engine `Request`; the engine thread reports text deltas and the end through callbacks
that hand them to this event loop (`call_soon_threadsafe`), so no route ever blocks on a forward. A request
that fails inside the engine fails alone: its answer (or its stream's error event) is an OpenAI-format error,
the other requests in the batch are untouched.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from . import engine as E
from .http import Server
from .schemas import APIError, ChatBody, CompletionBody, parse


def add_generation_routes(app: FastAPI, srv: Server) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionBody, await srv.body(request))
        adapter = srv.adapter_for(body.model)
        prompts = [
            p if isinstance(p, list) else await off_loop(srv, tokenize, srv, p) for p in body.prompts()
        ]
        return await generate(srv, body, adapter, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse(ChatBody, await srv.body(request))
        adapter = srv.adapter_for(body.model)
        ids = await off_loop(srv, chat_ids, srv, body)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await generate(srv, body, adapter, [ids], chat=True)


async def off_loop(srv: Server, fn, *args):
    """`fn(*args)` on the server's tokenizer thread: a huge prompt then holds up only other tokenizations, not
    the event loop (every stream, every other route). One thread: a fast tokenizer is not safe to share."""
    return await asyncio.get_running_loop().run_in_executor(srv.tokenizer_thread, fn, *args)


def fits(srv: Server, chars: int, param: str) -> None:
    """Raises APIError(400) for text that cannot fit the context whatever it says: every token stands for at
    most `srv.token_chars` characters, so it has at least chars / token_chars tokens (checked before the
    tokenizer spends seconds on megabytes of it)."""
    if chars > srv.engine.max_len * srv.token_chars:
        raise APIError(400, f"{param}: {chars} characters cannot fit this model's context of {srv.engine.max_len} "
                       f"tokens (a token is at most {srv.token_chars} characters)", param, "context_length_exceeded")  # fmt: skip


def tokenize(srv: Server, text: str) -> list[int]:
    fits(srv, len(text), "prompt")
    try:
        return list(srv.engine.tokenizer(text)["input_ids"])
    except Exception as err:  # e.g. a lone surrogate the tokenizer cannot encode
        raise APIError(400, f"prompt: the tokenizer cannot encode it ({str(err)[:200]})", "prompt") from None


def chat_ids(srv: Server, body: ChatBody) -> list[int]:
    tokenizer = srv.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"the model {srv.base_name!r} has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    fits(srv, sum(len(m["content"]) for m in messages), "messages")
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(ids["input_ids"])
    except Exception as err:  # the template's own error (e.g. roles out of order) is the user's to fix
        raise APIError(400, f"messages: the chat template failed: {str(err)[:300]}", "messages") from None


def make_requests(
    srv: Server, body, adapter: str | None, prompts: list[list[int]], chat: bool, events
) -> list:
    """One engine Request per prompt, checked (APIError 400 for an empty or too long prompt, bad token ids)."""
    engine, loop = srv.engine, asyncio.get_running_loop()
    if body.max_tokens is not None and body.max_tokens > srv.max_tokens_cap:
        raise APIError(400, f"max_tokens={body.max_tokens} is over this server's cap of {srv.max_tokens_cap}",
                       "max_tokens")  # fmt: skip
    vocab = engine.model.config.vocab_size
    reqs = []
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        # Default: the rest of the context (chat) or OpenAI's 16 (completions), within the cap.
        max_tokens = body.max_tokens or min(srv.max_tokens_cap, engine.max_len - len(ids) if chat else 16)
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
            on_done=lambda r: done(srv, r, loop, events),
        ))  # fmt: skip
    return reqs


def submit_all(srv: Server, reqs: list[E.Request], model: str) -> None:
    try:
        for r in reqs:
            srv.engine.submit(r)
    except (KeyError, ValueError) as err:
        for r in reqs:
            srv.engine.cancel(r)
        if isinstance(err, KeyError):  # deleted between the lookup and now
            raise APIError(404, f"the model {model!r} does not exist", "model", "model_not_found") from None
        raise APIError(400, str(err)) from None


async def generate(srv: Server, body, adapter: str | None, prompts: list[list[int]], chat: bool):
    events: asyncio.Queue = asyncio.Queue()
    reqs = make_requests(srv, body, adapter, prompts, chat, events)
    submit_all(srv, reqs, body.model)
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": body.model}  # fmt: skip
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            sse(srv, reqs, events, meta, chat, include_usage), media_type="text/event-stream"
        )
    try:
        finished = 0
        while finished < len(reqs):
            _, delta = await events.get()
            finished += delta is None
    finally:
        for r in reqs:
            if not r.done.is_set():
                srv.engine.cancel(r)
    failed = next((r for r in reqs if r.finish_reason == "error"), None)
    if failed is not None:
        raise error_of(failed, body.model)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
         "finish_reason": r.finish_reason} if chat else
        {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        for i, r in enumerate(reqs)
    ]  # fmt: skip
    obj = "chat.completion" if chat else "text_completion"
    return {**meta, "object": obj, "choices": choices, "usage": usage(reqs)}


def error_of(req: E.Request, model: str) -> APIError:
    """The OpenAI-format error for a request that failed inside the engine."""
    error = req.error or "unknown error"
    if error.startswith("KeyError"):  # its adapter was deleted while it waited
        return APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")
    if error.startswith("AdapterAccessError"):
        return APIError(403, f"adapter {model!r} cannot be loaded: {error}", "model", "adapter_load_failed")
    if error.startswith(("AdapterFileError", "AdapterUnsupported")):
        return APIError(500, f"adapter {model!r} failed to load: {error}", "model", "adapter_load_failed")
    return APIError(500, f"generation failed: {error}", code="generation_failed")


def done(srv: Server, r: E.Request, loop, events: asyncio.Queue) -> None:
    srv.metrics.completion(len(r.prompt_ids), r.completion_tokens, (r.finished or 0) - r.submitted)
    post(loop, events, (r, None))


async def sse(srv: Server, reqs, events, meta, chat: bool, include_usage: bool) -> AsyncIterator[str]:
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
                yield f"data: {json.dumps(error_of(r, meta['model']).body())}\n\n"
                continue
            yield chunk(index[r.id], None, r.finish_reason)
        if include_usage:
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': usage(reqs)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:  # the client went away: stop decoding for it
            if not r.done.is_set():
                srv.engine.cancel(r)


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
