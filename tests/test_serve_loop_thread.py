"""Which thread the engine's loop runs on: the caller's (`Engine.run`, `generate` on an idle engine, `lorakit
serve`'s main thread), or its own (`start`); outputs are the same either way, and stop / start / run compose."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from lorakit.models import load_model
from lorakit.serve import AdapterRegistry, Engine, Request
from lorakit.serve.app import create_app
from lorakit.serve.commands import serve_on_main_thread
from serve_fixtures import ADAPTERS, served_references

PROMPTS = ["hello", "the quick brown fox", "a", "xy"]
NAMES = [None, "a1", "a2", "a1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    return served_references(tmp, PROMPTS, NAMES, 12)


def engine_with_thread_log(setup):
    """An engine over a fresh model, and the list of threads its model's forwards ran on."""
    model_dir, dirs, *_ = setup
    model, tok = load_model(str(model_dir))
    reg = AdapterRegistry(model, "tiny")
    for n in ADAPTERS:
        reg.add(n, dirs[n], load=False)
    threads: list[threading.Thread] = []
    model.register_forward_pre_hook(lambda *_: threads.append(threading.current_thread()))
    return Engine(model, tok, reg, max_batch=2), threads


def requests(prompts):
    return [Request(p, n, 12, temperature=0) for p, n in zip(prompts, NAMES)]


def test_generate_on_an_idle_engine_runs_the_loop_in_the_calling_thread(setup):
    *_, prompts, refs = setup
    eng, threads = engine_with_thread_log(setup)
    got = eng.generate(requests(prompts))
    assert [r.output_ids for r in got] == refs
    assert threads and set(threads) == {threading.current_thread()}
    assert eng._thread is None and not eng._looping
    again = eng.generate(requests(prompts))  # the loop returned, the engine is reusable
    assert [r.output_ids for r in again] == refs


def test_started_engine_runs_on_its_thread_with_the_same_outputs(setup):
    *_, prompts, refs = setup
    eng, threads = engine_with_thread_log(setup)
    with eng:
        assert [r.output_ids for r in eng.generate(requests(prompts), timeout=120)] == refs
        with pytest.raises(RuntimeError, match="running already"):
            eng.run()
        with pytest.raises(RuntimeError, match="running already"):
            eng.start()
    assert {t.name for t in threads} == {"lorakit-engine"}
    threads.clear()
    with eng:  # started again after a stop
        assert [r.output_ids for r in eng.generate(requests(prompts), timeout=120)] == refs
    assert {t.name for t in threads} == {"lorakit-engine"}


def test_run_returns_on_stop_from_another_thread_and_cancels_what_is_left(setup):
    *_, prompts, refs = setup
    eng, threads = engine_with_thread_log(setup)
    third, stopped = threading.Event(), threading.Event()

    def on_delta(req, _):
        if req.completion_tokens == 3:  # hold the loop here until the other thread has called stop()
            third.set()
            assert stopped.wait(60)

    long = Request(prompts[1], "a1", 100, temperature=0, ignore_eos=True, on_delta=on_delta)
    waiting = [Request(p, n, 100, temperature=0, ignore_eos=True) for p, n in zip(prompts, NAMES)]
    for r in (long, *waiting):  # max_batch 2: some of them wait
        eng.submit(r)

    def stopper():
        assert third.wait(60)
        eng.stop()
        stopped.set()

    t = threading.Thread(target=stopper)
    t.start()
    eng.run()  # returns once stop() is called
    t.join()
    assert set(threads) == {threading.current_thread()}
    assert long.finish_reason == "cancelled" and long.completion_tokens == 3
    assert all(r.finish_reason == "cancelled" and r.done.is_set() for r in waiting)
    eng.stop()  # no loop runs: a no-op, and a later run is not stopped by it
    assert [r.output_ids for r in eng.generate(requests(prompts))] == refs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_decodes_on_the_main_thread_and_returns_when_the_server_exits(setup):
    import uvicorn

    *_, prompts, refs = setup
    eng, threads = engine_with_thread_log(setup)
    app = create_app(eng, eng.registry, "tiny", start_engine=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    answers = []

    def client():
        try:
            deadline = time.time() + 60
            while not server.started and time.time() < deadline:
                time.sleep(0.05)
            body = {"model": "a1", "prompt": prompts[1], "max_tokens": 12, "temperature": 0}
            answers.append(
                httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
            )
        finally:
            server.should_exit = True

    c = threading.Thread(target=client)
    c.start()
    assert serve_on_main_thread(server, eng) == 0
    c.join()
    assert threading.current_thread() is threading.main_thread()
    assert threads and set(threads) == {threading.main_thread()}
    assert answers[0]["choices"][0]["text"] == eng.tokenizer.decode(refs[1], skip_special_tokens=True)
    assert not eng._looping


def test_serve_returns_1_when_the_server_cannot_start(setup):
    import uvicorn

    eng, _ = engine_with_thread_log(setup)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(eng, eng.registry, "tiny", start_engine=False)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
        start = time.time()
        assert serve_on_main_thread(server, eng) == 1
    assert time.time() - start < 30 and not eng._looping
