"""Shared setup for the serve tests: a tiny Llama + tokenizer on disk, random adapters, a greedy reference."""

from __future__ import annotations

import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.serve.kvcache import cache_argument

ADAPTERS = ("a1", "a2", "a3", "a4")


def build(tmp_path, adapters=ADAPTERS):
    """Save a tiny Llama (with the tiny tokenizer) and one random adapter per name; returns (model_dir, {name: dir})."""
    model_dir = tmp_path / "tiny"
    base = tiny_llama(seed=0)
    # Larger logits than the random init gives: greedy choices are then far from ties, as in a trained model.
    with torch.no_grad():
        base.lm_head.weight.mul_(8)
    base.generation_config.eos_token_id = 2
    base.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    dirs = {}
    for i, name in enumerate(adapters):
        m = tiny_llama(seed=0)
        lorakit.add_adapter(m, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
        randomize_adapters(m, std=0.3, seed=10 + i)
        dirs[name] = tmp_path / "adapters" / name
        lorakit.save_adapter(m, dirs[name])
    return model_dir, dirs


def served(tmp_path, adapters=ADAPTERS):
    """`build`, then the reference: the saved base with every adapter loaded, and its tokenizer.
    Returns (model_dir, {name: dir}, reference model, tokenizer)."""
    from lorakit.models import load_model

    model_dir, dirs = build(tmp_path, adapters)
    ref, tok = load_model(str(model_dir))
    for n, d in dirs.items():
        lorakit.load_adapter(ref, d, name=n)
    return model_dir, dirs, ref, tok


def served_references(tmp_path, prompts: list[str], names: list, max_tokens: int):
    """`served`, then each prompt encoded and its plain greedy `reference` under adapter names[i] (None: the
    base). Returns (model_dir, {name: dir}, tokenizer, prompt ids, references)."""
    model_dir, dirs, ref, tok = served(tmp_path)
    ids = [tok.encode(p) for p in prompts]
    return model_dir, dirs, tok, ids, [reference(ref, p, n, max_tokens) for p, n in zip(ids, names)]


def reference(model, prompt_ids, adapter, max_tokens, eos=(2, 4)):
    """Plain greedy decoding, one request, no batching: `set_adapter` (or the base with adapters disabled)."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids])
    cache, out = DynamicCache(config=model.config), []
    name = cache_argument(model)
    with torch.inference_mode():
        if adapter is None:
            ctx = lorakit.disable_adapters(model)
        else:
            lorakit.set_adapter(model, adapter)
            ctx = _null()
        with ctx:
            for _ in range(max_tokens):
                logits = model(input_ids=ids, **{name: cache}, use_cache=True).logits[0, -1]
                token = int(torch.argmax(logits))
                if token in eos:
                    break
                out.append(token)
                ids = torch.tensor([[token]])
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def start_server(tmp_path, args: list[str], timeout: float = 90.0):
    """`lorakit serve` on a free loopback port with `args`; returns (process, url, log file). The caller stops
    it (`proc.terminate()`). Fails the test with the server's log if it does not come up."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": f"{os.environ.get('LORAKIT_SRC', src)}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    log = open(tmp_path / "server.log", "w+")
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "serve",
        "--port",
        str(port),
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd + args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.3)
