"""`lorakit serve` as a real process on loopback, driven by the official `openai` client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import lorakit
from lorakit.models import load_model
from serve_fixtures import ADAPTERS, build, reference

openai = pytest.importorskip("openai")
KEY = "sk-test-key"
PROMPTS = ["hello", "the quick brown fox", "a", "zzz yyy xxx"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model_dir, dirs = build(tmp, ADAPTERS + ("extra",))
    root = tmp / "root"
    root.mkdir()
    shutil.copytree(dirs["extra"], root / "extra")
    os.symlink(dirs["a1"], root / "escape")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--port", str(port),
           "--adapter-root", str(root), "--max-adapters", "3", "--api-key", KEY, "--max-tokens-cap", "64",
           "--threads", "1", "--log-level", "warning"]  # fmt: skip
    for n in ADAPTERS:
        cmd += ["--adapter", f"{n}={dirs[n]}"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        ref, tok = load_model(str(model_dir))
        for n in ADAPTERS + ("extra",):
            lorakit.load_adapter(ref, dirs[n], name=n)
        yield {"url": url, "ref": ref, "tok": tok, "root": root, "dirs": dirs}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=60)


def expected(server, prompt, model, n=12):
    ids = reference(server["ref"], server["tok"].encode(prompt), None if model == "tiny" else model, n)
    return server["tok"].decode(ids, skip_special_tokens=True)


def complete(c, model, prompt, n=12, **kw):
    return c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, **kw)


def test_models_health_and_metrics(server):
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["tiny", *ADAPTERS]
    assert httpx.get(f"{server['url']}/health").json()["status"] == "ok"
    complete(client(server), "a1", "hi", 3)
    text = httpx.get(f"{server['url']}/metrics").text
    assert 'lorakit_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "lorakit_generation_tokens_total" in text and "lorakit_request_latency_seconds_bucket" in text
    assert 'lorakit_adapter_loaded{adapter="a1"} 1' in text


def test_greedy_matches_offline_per_adapter(server):
    c = client(server)
    for model in ("tiny", *ADAPTERS):
        for prompt in PROMPTS[:2]:
            r = complete(c, model, prompt)
            assert r.choices[0].text == expected(server, prompt, model), (model, prompt)
            assert r.usage.prompt_tokens == len(server["tok"].encode(prompt))
    tok = server["tok"]
    r = c.completions.create(model="a1", prompt=["hello", "a"], max_tokens=12, temperature=0)  # two choices
    assert [ch.text for ch in r.choices] == [expected(server, "hello", "a1"), expected(server, "a", "a1")]
    ids = tok.encode("hello")  # a prompt given as token ids
    r = c.completions.create(model="a1", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected(server, "hello", "a1")
    messages = [{"role": "user", "content": "hi there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    want = tok.decode(reference(server["ref"], ids["input_ids"], "a2", 10), skip_special_tokens=True)
    r = c.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.object == "chat.completion"


def test_concurrent_equals_one_at_a_time(server):
    c = client(server)
    jobs = [(m, p) for m in ("a1", "a2", "a3", "tiny") for p in PROMPTS[:3]]
    one_by_one = [complete(c, m, p, 16).choices[0].text for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: complete(c, j[0], j[1], 16).choices[0].text, jobs))
    assert together == one_by_one
    assert one_by_one[0] == expected(server, PROMPTS[0], "a1", 16)


def test_streaming_equals_non_streaming(server):
    c = client(server)
    full = complete(c, "a3", PROMPTS[1], 20)
    parts = list(complete(c, "a3", PROMPTS[1], 20, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    messages = [{"role": "user", "content": "abc"}]
    whole = c.chat.completions.create(model="a4", messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model="a4", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
        whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_seed_and_stop(server):
    c = client(server)
    kw = {"model": "a1", "prompt": "seeded", "max_tokens": 16, "temperature": 0.9, "top_p": 0.9}
    a = c.completions.create(seed=7, **kw).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(complete, c, m, "x", 16) for m in ("a2", "a3", "tiny")]
        b = c.completions.create(seed=7, **kw).choices[0].text
        [f.result() for f in others]
    assert a == b
    full = complete(c, "a2", PROMPTS[1], 16).choices[0].text
    stop = full[6:8]
    r = complete(c, "a2", PROMPTS[1], 16, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_adapter_load_use_and_delete(server):
    c = client(server)
    r = httpx.post(f"{server['url']}/v1/adapters", json={"name": "extra", "path": "extra"},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert "extra" in [m.id for m in c.models.list().data]
    assert complete(c, "extra", "hello").choices[0].text == expected(server, "hello", "extra")
    r = httpx.delete(f"{server['url']}/v1/adapters/extra", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        complete(c, "extra", "hello")


def _error(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_errors(server):
    c, url, auth = client(server), server["url"], {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(c, "nope", "hi")
    for bad in ({"temperature": 5}, {"top_p": 0}, {"n": 2}, {"max_tokens": 0}, {"logprobs": 3}):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="a1", prompt="hi", **{"max_tokens": 4, **bad})
    with pytest.raises(openai.BadRequestError, match="cap of 64"):
        complete(c, "a1", "hi", 65)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        complete(c, "a1", "x" * 100, 40)
    err = _error(httpx.post(f"{url}/v1/completions", content=b"{not json", headers=auth), 400)
    assert err["type"] == "invalid_request_error"
    _error(httpx.post(f"{url}/v1/completions", json={"model": "a1"}, headers=auth), 400)  # no prompt
    _error(httpx.post(f"{url}/v1/chat/completions", json={"model": "a1", "messages": []}, headers=auth), 400)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert _error(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
    for path in ("escape", "../", str(server["dirs"]["a2"])):
        r = httpx.post(f"{url}/v1/adapters", json={"name": "evil", "path": path}, headers=auth)
        assert _error(r, 403)["type"] == "permission_error"
    _error(httpx.post(f"{url}/v1/adapters", json={"name": "evil", "path": "escape"}), 401)
    _error(httpx.post(f"{url}/v1/adapters", json={"name": "a1", "path": "extra"}, headers=auth), 409)
    _error(httpx.post(f"{url}/v1/adapters", json={"name": "m", "path": "missing"}, headers=auth), 404)
    _error(httpx.delete(f"{url}/v1/adapters/nope", headers=auth), 404)


def test_bounded_load(server):
    """200 requests, 16 at a time, over 4 adapters (LRU-capped at 3 loaded): no errors, exact greedy outputs."""
    c = client(server)
    jobs = [(ADAPTERS[i % 4], PROMPTS[i % 3]) for i in range(200)]
    want = {(m, p): expected(server, p, m, 8) for m, p in set(jobs)}

    def one(job):
        t = time.perf_counter()
        r = complete(c, job[0], job[1], 8)
        return time.perf_counter() - t, r.usage.completion_tokens, r.choices[0].text == want[job]

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    lat = torch.tensor([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    print(f"\nload: 200 requests, 16 concurrent: p50 {lat.quantile(0.5):.3f} s, p99 {lat.quantile(0.99):.3f} s, "
          f"{tokens / wall:.1f} tokens/s")  # fmt: skip
    assert all(r[2] for r in results)
    assert wall < 120
    metrics = httpx.get(f"{server['url']}/metrics").text
    evictions = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("lorakit_adapter_evictions_total"))  # fmt: skip
    assert evictions > 0
