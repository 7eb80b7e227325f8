"""Every class of bad request, mixed with good concurrent traffic, against a real `lorakit serve` process.

The server must answer each bad request with the right 4xx in OpenAI's format (naming the parameter), answer
every good request with exactly its one-at-a-time output, before, during and after, keep no adapter pinned,
really unload on DELETE, refuse an adapter swapped for a symlink out of the root after its eviction, sit idle
without burning CPU, and stop promptly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import lorakit
from conftest import tiny_llama
from lorakit.models import load_model
from serve_fixtures import ADAPTERS, build, reference, start_server

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["hello", "the quick brown fox", "a"]


def bad_cases() -> list[tuple[str, str, str, dict, int, str | None]]:
    """(class, method, path, httpx kwargs, expected status, the `param` the error must name) for every case."""
    ok = {"model": "a1", "prompt": "hi", "max_tokens": 4}
    cases = []
    params = {"temperature": [float("nan"), float("inf"), -1, 3, True, "0.5"],
              "top_p": [0, 1.5, float("nan")], "max_tokens": [0, True, 2.5, 1e30, 10**30],
              "seed": [2**64, -(2**63) - 1, 1.5, "7"], "stop": [["a", "b", "c", "d", "e"], ["x" * 2000], [1]],
              "stream": ["yes"], "stream_options": [{"include_usage": "yes"}, {"foo": 1}], "n": [2],
              "logprobs": [3], "ignore_eos": ["no"]}  # fmt: skip
    for param, values in params.items():
        for v in values:
            cases.append(
                (f"parameter {param}", "POST", "/v1/completions", {"json": {**ok, param: v}}, 400, param)
            )
    for model in ("a1", "a2"):  # the same bad request to two adapters (with --max-adapters 2)
        cases.append(("parameter seed", "POST", "/v1/completions", {"json": {**ok, "model": model, "seed": 2**64}},
                      400, "seed"))  # fmt: skip
    # "x" * 900_000: fits the body limit, tokenized off the event loop, longer than the context.
    for prompt in ([-1], [10**30], [True], [], "\ud800", [[5, 6], []], ["x"] * 300, [1.5], "x" * 900_000):
        cases.append(("prompt", "POST", "/v1/completions", {"json": {**ok, "prompt": prompt}}, 400, "prompt"))
    chat = {"model": "a2", "max_tokens": 4}
    for messages in (
        [],
        [{"role": 1, "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "user", "content": "x" * 10}] * 3 + [{"role": "assistant", "content": 5}],
    ):
        cases.append(("messages", "POST", "/v1/chat/completions", {"json": {**chat, "messages": messages}}, 400,
                      "messages"))  # fmt: skip
    deep = b'{"model": "a1", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    big = json.dumps({**ok, "prompt": "x" * (2 << 20)}).encode()
    cases += [
        ("body nesting", "POST", "/v1/completions", {"content": deep}, 400, None),
        ("body nesting", "POST", "/v1/adapters", {"content": b"[" * 50_000 + b"]" * 50_000}, 400, None),
        ("body size", "POST", "/v1/completions", {"content": big}, 413, None),
        ("body size", "POST", "/v1/completions", {"content": iter([big[i : i + 65536] for i in range(0, len(big), 65536)])},
         413, None),
        ("body encoding", "POST", "/v1/completions", {"content": b"{not json"}, 400, None),
        ("body encoding", "POST", "/v1/completions", {"content": b'{"model": "\xff\xfe"}'}, 400, None),
        ("body encoding", "POST", "/v1/completions", {"content": b"[1, 2]"}, 400, None),
        ("body encoding", "POST", "/v1/completions", {"content": b"null"}, 400, None),
    ]  # fmt: skip
    adapter_bodies = [({"name": "n", "path": "a\0b"}, 400, "path"), ({"name": "x" * 5000, "path": "extra"}, 400, "name"),
                      ({"name": "a\0b", "path": "extra"}, 400, "name"), ({"name": "n", "path": "x" * 300}, 400, "path"),
                      ({"name": "n", "path": "x/" * 3000}, 400, "path"), ({"name": "n", "path": "\ud800"}, 400, "path"),
                      ({"name": "n", "path": "../"}, 403, "path"), ({"name": "biased", "path": "biased"}, 400, "path"),
                      ({"name": 5, "path": "extra"}, 400, "name")]  # fmt: skip
    for body, status, param in adapter_bodies:
        cases.append(("adapter body", "POST", "/v1/adapters", {"json": body}, status, param))
    cases.append(
        ("model name", "POST", "/v1/completions", {"json": {**ok, "model": "m" * 5000}}, 404, "model")
    )
    for path in ("/docs", "/openapi.json", "/redoc"):
        cases.append(("docs with --api-key", "GET", path, {}, 404, None))
    return cases


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    model_dir, dirs = build(tmp, ADAPTERS + ("extra",))
    root = tmp / "root"
    root.mkdir()
    shutil.copytree(dirs["extra"], root / "extra")
    m = tiny_llama(seed=0)
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, targets=["q_proj"], bias="all"))  # not per-row: a 400
    lorakit.save_adapter(m, root / "biased")
    args = ["--model", str(model_dir), "--adapter-root", str(root), "--max-adapters", "2", "--api-key", KEY,
            "--max-tokens-cap", "64", "--max-body-mb", "1", "--adapter-cache-mb", "0", "--shutdown-timeout", "2"]  # fmt: skip
    for n in ADAPTERS:
        args += ["--adapter", f"{n}={dirs[n]}"]
    proc, url, log = start_server(tmp, args)
    ref, tok = load_model(str(model_dir))
    for n in ADAPTERS + ("extra",):
        lorakit.load_adapter(ref, dirs[n], name=n)
    try:
        h = {"proc": proc, "url": url, "ref": ref, "tok": tok, "root": root, "dirs": dirs, "want": {}}
        for m in ADAPTERS + ("tiny", "extra"):
            for p in PROMPTS:
                expected(h, m, p)
        yield h
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def expected(h, model: str, prompt: str, n: int = 10) -> str:
    """The offline one-request greedy text (call from one thread: it switches the reference's adapter)."""
    key = (model, prompt, n)
    if key not in h["want"]:
        ids = reference(h["ref"], h["tok"].encode(prompt), None if model == "tiny" else model, n)
        h["want"][key] = h["tok"].decode(ids, skip_special_tokens=True)
    return h["want"][key]


def good(h, model: str, prompt: str, n: int = 10) -> tuple[bool, str]:
    """One greedy completion; (its text equals the offline reference, computed beforehand, the text)."""
    r = httpx.post(f"{h['url']}/v1/completions", headers=AUTH, timeout=120,
                   json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    return text == h["want"][(model, prompt, n)], text


def send(h, case) -> tuple[int, dict | None]:
    _, method, path, kwargs, _, _ = case
    if (
        "json" in kwargs
    ):  # Python's encoder: NaN, Infinity and lone surrogates go out as a client may send them
        kwargs = {"content": json.dumps(kwargs["json"]).encode()}
    r = httpx.request(method, f"{h['url']}{path}", headers=AUTH, timeout=120, **kwargs)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_bad_requests_mixed_with_good_traffic(hostile):
    h = hostile
    jobs = [(m, p) for m in ("a1", "a2", "a3", "a4", "tiny") for p in PROMPTS]
    before = [good(h, m, p)[1] for m, p in jobs]
    cases = bad_cases()
    mixed = [("bad", c) for c in cases] + [("good", j) for j in jobs * 2]
    mixed.sort(key=lambda x: hash(str(x[1])) % 97)  # interleaved, deterministically within a run
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: send(h, x[1]) if x[0] == "bad" else good(h, *x[1]), mixed))
    wrong = []
    for (kind, item), got in zip(mixed, results):
        if kind == "good":
            if not got[0]:
                wrong.append(("good", item, got[1]))
            continue
        status, body = got
        err = (body or {}).get("error") if isinstance(body, dict) else None
        if status != item[4] or not (err and set(err) == {"message", "type", "param", "code"}):
            wrong.append((item[0], item[3].get("json", "<raw>"), status, body))
        elif item[5] and not str(err["param"]).startswith(item[5]):
            wrong.append((item[0], "param", err["param"], item[5]))
    assert not wrong, "\n".join(repr(w)[:300] for w in wrong)
    # A temperature so small that a naive softmax overflows is a valid request, exactly greedy.
    cold = httpx.post(f"{h['url']}/v1/completions", headers=AUTH, timeout=60, json={
        "model": "a3", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 1e-40, "seed": 2**64 - 1}).json()  # fmt: skip
    assert cold["choices"][0]["text"] == before[jobs.index(("a3", PROMPTS[1]))]
    after = [good(h, m, p)[1] for m, p in jobs]
    assert after == before and all(good(h, m, p)[0] for m, p in jobs[:3])


def test_adapters_released_deleted_and_refused_after_swap(hostile):
    h = hostile
    r = httpx.post(f"{h['url']}/v1/adapters", headers=AUTH, json={"name": "extra", "path": "extra"})
    assert r.status_code == 200, r.text
    assert good(h, "extra", "hello")[0]
    for m in ("a1", "a2"):  # --max-adapters 2: extra is evicted
        good(h, m, "a")
    shutil.rmtree(h["root"] / "extra")
    os.symlink(h["dirs"]["a3"], h["root"] / "extra")  # now points out of the root
    r = httpx.post(f"{h['url']}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "extra", "prompt": "hello", "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert r.status_code == 403 and "outside the adapter root" in r.json()["error"]["message"], r.text
    assert good(h, "a4", "hello")[0]
    metrics = httpx.get(f"{h['url']}/metrics").text
    assert "lorakit_pinned_adapters 0" in metrics
    assert httpx.delete(f"{h['url']}/v1/adapters/a4", headers=AUTH).status_code == 200
    metrics = httpx.get(f"{h['url']}/metrics").text
    assert 'adapter="a4"' not in metrics and 'adapter="extra"' not in metrics
    time.sleep(0.5)
    ticks = cpu_ticks(h["proc"].pid)
    time.sleep(2.0)
    used = (cpu_ticks(h["proc"].pid) - ticks) / os.sysconf("SC_CLK_TCK")
    assert used < 0.3, f"the idle server used {used:.2f} s of CPU in 2 s"


def test_sigterm_with_requests_in_flight(hostile):
    h = hostile
    got_first = threading.Event()

    def stream():
        body = {
            "model": "a1",
            "prompt": "x",
            "max_tokens": 64,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with httpx.stream("POST", f"{h['url']}/v1/completions", headers=AUTH, json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    got_first.set()
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    assert got_first.wait(60)
    start = time.time()
    h["proc"].send_signal(signal.SIGTERM)
    h["proc"].wait(30)
    assert time.time() - start < 20
    for t in threads:
        t.join(30)
