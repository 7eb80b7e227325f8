"""The serving engine: one loop that decodes every running request together, each row with its own adapter.

The loop runs on the caller's thread (`Engine.run`, or `generate` on an idle engine: on a CPU, prefer the thread
that loaded the model; `run` says why) or on a thread of its own (`Engine.start`). Top to bottom (`Engine._loop`):
1. run queued calls (`Engine.call`): adapter loads and deletes mutate the model, so they happen here, between
   forwards, and hold the batch back only for as long as they take;
2. admit waiting requests while the batch has room, pinning each one's adapter: first, in arrival order, those
   that need no load (the base, or an adapter resident in a slot), then those whose adapter must be made
   resident (evicting the least recently used adapter no running row uses), while a slot can be freed. A
   request passed over `max_passed` times (later requests admitted before it) goes first: nothing behind it
   is admitted until it is (so running rows drain and free a slot for it), which bounds its wait;
3. prefill (`serve/prefill.py`), within a budget of `prefill_chunk` prompt tokens per loop: admitted prompts
   that fit together go in one forward (left-padded, masked); a longer prompt goes alone, one chunk per loop, so running rows keep
   decoding meanwhile (one token per loop) instead of waiting for the whole prompt. A prefilled row samples its
   first token and joins the batch;
4. one forward for the whole batch, one new token per row, under `lorakit.per_row_adapters` (row i uses its own
   adapter, None = base), the rows in slot order (`_slot_order`: each adapter's rows one run, and the views
   path of fast/rows.py when the slots hold equally many); the rows' caches are kept together by `BatchCache`
   (left padding, masks, per-row positions), so a row's greedy output does not depend on the other rows;
5. sample each row (its own generator when seeded), release text, retire finished rows.

Requests join between steps (continuous batching). Callbacks (`on_delta`, `on_done`) run on the loop's thread
and must be quick (the HTTP layer hands them to its event loop).

Isolation: whatever fails for one request (its parameters, its adapter's load, sampling, decoding its text, an
exception raised by its callbacks) ends that request alone with finish_reason "error" and `error` set; its
adapter is released at once and the other rows decode on, giving the tokens they would give alone. Only a
failure of the batched forward itself fails every row in it.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

import lorakit

from .kvcache import BatchCache, cache_argument
from .prefill import Prefill
from .prefill import describe as _describe
from .registry import AdapterRegistry
from .sampling import TextStream, check_sampling, next_token


@dataclass(eq=False)
class Request:
    """One generation. Inputs first; the engine fills the rest. `adapter` None: the base model.

    temperature 0 is greedy; `seed` makes sampling reproducible whatever the batch. Stops at an end-of-sequence
    token, a `stop` string (cut from the text) or `max_tokens` tokens.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_tokens tokens whatever they are (benchmarks)
    on_delta: Callable[[Request, str], None] | None = None
    on_done: Callable[[Request], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Filled by the engine:
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    passed: int = 0  # later requests admitted before this one (preferring resident adapters)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    req: Request
    text: TextStream
    generator: torch.Generator | None
    last: int = 0
    closed: bool = False  # finished: its adapter released, its callbacks called (exactly once)
    cache: DynamicCache | None = None  # while its prompt is prefilled in chunks: the part done so far
    prefilled: int = 0  # prompt tokens in `cache`


class Engine(Prefill):
    """Continuous batching over one model. Start it with `start()` (or use it as a context manager).

    Args:
        model, tokenizer: as `lorakit.models.load_model` returns them.
        registry: the adapters requests may name (None: base model only).
        max_batch: most rows decoded together; more requests wait.
        max_len: longest prompt + completion, in tokens (default: the model's max_position_embeddings).
        prefill_chunk: prompt tokens prefilled per loop (between two decode steps): prompts that fit together
            share one forward, a longer one is prefilled in chunks of this size.
        max_passed: how often a waiting request may be passed over by later ones whose adapter is resident
            (0: strict arrival order).
    """

    def __init__(self, model, tokenizer, registry: AdapterRegistry | None = None, max_batch: int = 16,
                 max_len: int | None = None, prefill_chunk: int = 256, max_passed: int = 32) -> None:  # fmt: skip
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: expected at least 1")
        if max_passed < 0:
            raise ValueError(f"max_passed={max_passed}: expected at least 0")
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.max_batch = max_batch
        self.max_passed = max_passed
        self.prefill_chunk = prefill_chunk
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_len = max_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.device = next(model.parameters()).device
        eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
        self.eos_ids = {int(e) for e in eos if e is not None}
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_arg = cache_argument(model)
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._rows: list[_Row] = []
        self._prefilling: list[_Row] = []  # admitted (adapter pinned), prompt not fully prefilled yet
        self._cache = BatchCache(model.config)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._looping = False  # the loop runs (start's thread or run's caller)
        self._stalled = False  # every waiting request waits for an adapter slot and nothing runs: sleep
        self.steps = 0  # batched decode forwards
        self.rows_stepped = 0  # sum of their batch sizes
        self.tokens = 0  # tokens sampled
        self.prefills = 0  # prefill forwards
        self.prefill_rows = 0  # sum of their batch sizes

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Run the loop on a thread of its own (see `run` for the thread to prefer on a CPU). Raises
        RuntimeError if the loop runs already."""
        if not self._claim_loop():
            raise RuntimeError("the engine's loop is running already")
        self._thread = threading.Thread(target=self._serve, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run the loop in the calling thread until `stop()` (from another thread or a callback), or until
        `until()` is true (checked between turns; requests still queued then stay queued).

        On a CPU, run it on the thread that loaded the model, which for a script is the main thread (what
        `lorakit serve` does, its HTTP server on another thread): GNU OpenMP, PyTorch's CPU thread pool,
        counts every thread team in the process, and once a second thread computes with more than one
        intra-op thread, its workers stop spinning between operations and each operation pays a wake-up
        (measured here, 2 cores, a 16×576 by 576×16 matmul: 8 µs on the main thread, 60-160 µs on a second;
        the default model served 32 requests of 32 tokens at batch 16 1.2-2× faster this way).
        Raises RuntimeError if the loop runs already.
        """
        if not self._claim_loop():
            raise RuntimeError("the engine's loop is running already")
        self._serve(until)

    def _claim_loop(self) -> bool:
        """Mark the loop as running; False if it runs already (in a thread or a caller)."""
        with self._cv:
            if self._looping:
                return False
            self._looping = True
            return True

    def _serve(self, until: Callable[[], bool] | None = None) -> None:
        try:
            self._loop(until)
        finally:
            with self._cv:
                self._looping = self._stopping = False

    def stop(self) -> None:
        """Stop the running loop (no-op when none runs): running and queued requests end "cancelled". Waits
        for `start`'s thread; `run` returns in its own thread."""
        with self._cv:
            self._stopping = self._looping
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raises ValueError when the prompt plus `max_tokens` does not fit the context."""
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len + max_tokens > self.max_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_len} tokens; the request needs "
                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)"
            )

    def submit(self, req: Request) -> Request:
        """Queue `req`; returns it. Raises ValueError (see `check`, `sampling.check_sampling`, token ids outside
        the vocabulary), KeyError for an unknown adapter."""
        check_sampling(req.temperature, req.top_p, req.seed, req.max_tokens)
        self.check(len(req.prompt_ids), req.max_tokens)
        vocab = self.model.config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        if req.adapter is not None and (self.registry is None or not self.registry.is_known(req.adapter)):
            raise KeyError(f"no adapter named {req.adapter!r}")
        req.submitted = time.perf_counter()
        with self._cv:
            self._waiting.append(req)
            self._stalled = False
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop `req` at the next step (finish_reason "cancelled")."""
        req.cancelled = True
        with self._cv:
            self._stalled = False
            self._cv.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the engine thread between two steps; the future holds its result or exception."""
        future: Future = Future()
        with self._cv:
            self._calls.append((fn, future))
            self._stalled = False
            self._cv.notify_all()
        return future

    def generate(self, requests: list[Request], timeout: float | None = None) -> list[Request]:
        """Submit `requests` together and wait for all of them (a convenience for scripts and tests). When the
        loop is not running, it runs here, in the calling thread, until they are done (`run`; `timeout`
        then does not apply)."""
        for r in requests:
            self.submit(r)
        if self._claim_loop():
            self._serve(until=lambda: all(r.done.is_set() for r in requests))
        for r in requests:
            if not r.done.wait(timeout):
                raise TimeoutError(f"request {r.id} did not finish within {timeout} s")
        return requests

    @property
    def running(self) -> int:
        return len(self._rows) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- engine thread -----------------------------------------------------------------------------------------

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._calls or self._busy() or (until and until())):
                        self._cv.wait()
                    if self._stopping:
                        break
                    if until is not None and until():
                        return  # the caller's requests are done: whatever else is queued stays queued
                self._iterate()
        for row in self._rows + self._prefilling:
            self._finish(row, "cancelled")
        for req in self._waiting:
            self._done(req, "cancelled")

    def _iterate(self) -> None:
        """One turn of the loop (see the module docstring): queued calls, admission, prefill, one decode step.
        Tests drive it directly (under torch.inference_mode) to step an engine that was never started."""
        with self._cv:
            calls, self._calls = list(self._calls), deque()
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the caller through the future
                    future.set_exception(err)
        self._admit()
        self._prefill_some()
        self._regroup()
        try:
            if self._rows:
                self._step()
        except Exception as err:  # a failed batched forward fails the requests in it, not the server
            for row in self._rows:
                self._finish(row, "error", _describe(err))
            self._rows, self._cache = [], BatchCache(self.model.config)

    def _busy(self) -> bool:
        return bool(self._rows or self._prefilling or (self._waiting and not self._stalled))

    def _admit(self) -> None:
        """Admit waiting requests while the batch has room (the policy: module docstring, step 2)."""
        with self._cv:
            queue, self._waiting = list(self._waiting), deque()
        passed: list[Request] = []  # not admitted by the first pass, in arrival order
        urgent = False  # one of them was passed over max_passed times: nothing behind it goes first
        for req in queue:  # 1. what needs no load
            if req.cancelled:
                self._done(req, "cancelled")
            elif not urgent and self._room() and self._resident(req):
                self._start(req)
                for r in passed:
                    r.passed += 1
                urgent = any(r.passed >= self.max_passed for r in passed)
            else:
                passed.append(req)
                urgent = urgent or req.passed >= self.max_passed
        left, stuck = [], False
        for req in passed:  # 2. what needs its adapter made resident, while a slot can be freed
            if req.cancelled:
                self._done(req, "cancelled")
            elif stuck or not self._room() or not self._start(req):
                stuck = stuck or bool(self._room())  # every slot held by running rows: wait for one to end
                left.append(req)
        with self._cv:
            arrived = bool(self._waiting)  # submitted meanwhile: not looked at yet
            self._waiting.extendleft(reversed(left))
            # Nothing runs and nothing could be admitted: sleep until a submit, a cancel or a call (releases
            # happen only when rows finish, and no row runs), instead of retrying in a loop.
            self._stalled = bool(left) and not arrived and not self._rows and not self._prefilling

    def _room(self) -> bool:
        return len(self._rows) + len(self._prefilling) < self.max_batch

    def _resident(self, req: Request) -> bool:
        return req.adapter is None or self.registry.resident(req.adapter)

    def _start(self, req: Request) -> bool:
        """Pin `req`'s adapter (made resident if needed) and queue its prefill. False: no slot can be freed
        now (req stays waiting). A request whose adapter fails to load, or whose generator cannot be made,
        ends with an error (True: it left the queue)."""
        try:
            if req.adapter is not None and not self.registry.acquire(req.adapter):
                return False
        except Exception as err:  # this request's adapter failed to load: this request fails
            self._done(req, "error", _describe(err))
            return True
        row = _Row(req, TextStream(self.tokenizer, req.stop), None)
        try:
            if req.seed is not None and req.temperature > 0:
                row.generator = torch.Generator().manual_seed(req.seed)
        except Exception as err:
            self._finish(row, "error", _describe(err))
            return True
        self._prefilling.append(row)
        return True

    def _regroup(self) -> None:
        order = self._slot_order(self._rows)
        if order != list(range(len(self._rows))):
            self._rows = [self._rows[i] for i in order]
            self._cache.keep(order)

    def _slot_order(self, rows: list) -> list[int]:
        """The indices of `rows` in slot order (base rows last, ties in their order): each adapter's rows are
        then one contiguous run, and when the used slots hold equally many rows the per-row LoRA path runs on
        views (fast/rows.py), gathering nothing. (A row's adapter is pinned, so resident: its slot is fixed.)"""
        slot = {a: self.registry.slot(a) for a in {row.req.adapter for row in rows} if a is not None}

        def place(i: int) -> tuple[float, int]:
            s = slot.get(rows[i].req.adapter)
            return (math.inf if s is None else s, i)  # (never None for a pinned adapter; last if it were)

        return sorted(range(len(rows)), key=place)

    def _forward(self, adapters: list[str | None], cache, **inputs):
        """The model's forward with row i under adapter adapters[i] (None: the base), reading and extending
        the KV cache `cache`: the engine's one use of the per-row adapter API."""
        with lorakit.per_row_adapters(self.model, adapters):
            return self.model(**inputs, **{self._cache_arg: cache}, use_cache=True)

    def _last_logits(self) -> dict:
        return {"logits_to_keep": 1} if self._keep_arg else {}

    def _step(self) -> None:
        ids = torch.tensor([[row.last] for row in self._rows], device=self.device)
        mask, positions = self._cache.step_inputs(self.device)
        out = self._forward(
            [row.req.adapter for row in self._rows], self._cache.cache,
            input_ids=ids, attention_mask=mask, position_ids=positions,
        )  # fmt: skip
        self._cache.advance()
        self.steps += 1
        self.rows_stepped += len(self._rows)
        logits = out.logits[:, -1]
        keep = []
        for i, row in enumerate(self._rows):
            try:
                if self._advance(row, logits[i]):
                    keep.append(i)
            except Exception as err:  # sampling, decoding or a callback failed for this row: it alone ends
                self._finish(row, "error", _describe(err))
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._cache.keep(keep)

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample the row's next token and release its text; False when the row is finished."""
        req = row.req
        if req.cancelled:
            self._finish(row, "cancelled")
            return False
        token = next_token(logits, req.temperature, req.top_p, row.generator)
        req.completion_tokens += 1
        self.tokens += 1
        if token in self.eos_ids and not req.ignore_eos:
            self._emit(row, row.text.finish())
            self._finish(row, "stop")
            return False
        req.output_ids.append(token)
        self._emit(row, row.text.push(token))
        if row.text.stopped:
            self._finish(row, "stop")
            return False
        if len(req.output_ids) >= req.max_tokens:
            self._emit(row, row.text.finish())
            self._finish(row, "length")
            return False
        row.last = token
        return True

    def _emit(self, row: _Row, delta: str) -> None:
        if delta and row.req.on_delta is not None:
            row.req.on_delta(row.req, delta)

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.closed:
            return
        row.closed = True
        row.req.text = row.text.text
        if row.req.adapter is not None:
            self.registry.release(row.req.adapter)
        self._done(row.req, reason, error)

    def _done(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error = reason, error
        req.finished = time.perf_counter()
        try:
            if req.on_done is not None:
                req.on_done(req)
        except Exception as err:  # the caller's bug: record it, but the request is over either way
            req.finish_reason, req.error = "error", f"on_done callback failed: {_describe(err)}"
        finally:
            req.done.set()


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, list | tuple) else [x]
