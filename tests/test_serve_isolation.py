"""One bad request never hurts another: engine-level isolation, parameter checks, and the registry's file checks."""

from __future__ import annotations

import math
import os
import re
import shutil
import time

import pytest
import torch

import lorakit
import lorakit.serve.engine as engine_module
from conftest import tiny_llama
from lorakit.models import load_model
from lorakit.serve import AdapterAccessError, AdapterRegistry, AdapterUnsupported, Engine, Request
from lorakit.serve.files import read_checked
from lorakit.serve.sampling import next_token
from serve_fixtures import ADAPTERS, reference, served

PROMPTS = ["hello", "the quick brown fox", "a", "zzz yyy xxx"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    model_dir, dirs, ref, tok = served(tmp)
    return tmp, model_dir, dirs, ref, tok


def registry(setup, **kw):
    _, model_dir, dirs, _, tok = setup
    model, _ = load_model(str(model_dir))
    return AdapterRegistry(model, "tiny", **kw), tok


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def test_one_failing_row_fails_alone(setup, monkeypatch):
    """Failures injected into single rows of a running batch (a raising callback, a sampling error, an adapter
    whose file broke): those requests end in "error", their adapters are released, the others give exactly
    their one-at-a-time tokens, DELETE then really unloads, and the idle engine sleeps."""
    tmp, _, dirs, ref, tok = setup
    broken = tmp / "broken"
    shutil.copytree(dirs["a4"], broken, dirs_exist_ok=True)
    reg, tok = registry(setup, max_loaded=2, cache_bytes=0)
    for n in ADAPTERS[:3]:
        reg.add(n, dirs[n], load=False)
    reg.add("broken", broken, load=False)
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # breaks after registration
    real = engine_module.next_token

    def sampling(logits, temperature, top_p, generator):  # fails for the marked request's row only
        if temperature == 0.123:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(engine_module, "next_token", sampling)

    def raising(after):
        def on_delta(r, d):
            if len(r.output_ids) >= after:
                raise RuntimeError("injected callback failure")

        return on_delta

    ids = [tok.encode(p) for p in PROMPTS]
    good = [
        Request(ids[i], n, 20, temperature=0, ignore_eos=True) for i, n in enumerate(["a1", "a2", None, "a1"])
    ]
    bad = [
        Request(ids[0], "a2", 20, temperature=0, ignore_eos=True, on_delta=raising(3)),
        Request(ids[1], "a1", 20, temperature=0.123, ignore_eos=True),
        Request(ids[2], "broken", 20, temperature=0),
        Request(ids[3], "a2", 20, temperature=0, on_done=lambda r: 1 / 0),
    ]
    with Engine(reg.model, tok, reg, max_batch=8) as eng:
        eng.generate(good[:2] + bad + good[2:], timeout=120)
        assert reg.pinned() == {}
        eng.call(lambda: reg.remove("a2")).result(30)
        assert reg.slots.index_of("a2") is None and not reg.resident("a2")
        time.sleep(0.2)
        before = cpu_seconds()
        time.sleep(1.0)
        idle = cpu_seconds() - before
    for r, (i, n) in zip(good, enumerate(["a1", "a2", None, "a1"])):
        assert r.error is None and r.output_ids == reference(ref, ids[i], n, 20, eos=()), (i, n)
    assert all(r.finish_reason == "error" for r in bad)
    assert "injected callback failure" in bad[0].error and "injected sampling failure" in bad[1].error
    assert bad[2].error.startswith("AdapterFileError") and "broken" in bad[2].error
    assert "on_done callback failed" in bad[3].error and bad[3].done.is_set()
    assert idle < 0.3, f"the idle engine used {idle:.2f} s of CPU in 1 s"


def test_tiny_temperature_is_exact_and_bad_parameters_are_refused(setup):
    _, _, _, ref, tok = setup
    ids = tok.encode(PROMPTS[1])
    reg, tok = registry(setup)
    reg.add("a1", setup[2]["a1"])
    with Engine(reg.model, tok, reg, max_batch=4) as eng:
        cold, other = eng.generate([Request(ids, "a1", 12, temperature=1e-40, seed=2**64 - 1),
                                    Request(ids, None, 12, temperature=0)], 60)  # fmt: skip
        assert cold.error is None and cold.output_ids == reference(ref, ids, "a1", 12)
        assert other.output_ids == reference(ref, ids, None, 12)
        bad = {"seed": [2**64, -(2**63) - 1, True, 1.5], "temperature": [math.nan, math.inf, -1, 2.5, True],
               "top_p": [0, math.nan, 1.5], "max_tokens": [0, True, 2.5]}  # fmt: skip
        for param, values in bad.items():
            for v in values:
                with pytest.raises(ValueError, match=param):
                    eng.submit(Request(ids, "a1", **{"max_tokens": 4, param: v}))
        for prompt in ([-1], [reg.model.config.vocab_size], [True], [2**70]):
            with pytest.raises(ValueError, match="token ids"):
                eng.submit(Request(prompt, None, 4))
        assert reg.pinned() == {} and eng.running == 0


def test_next_token_survives_any_positive_temperature():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, -1e30])
    g = torch.Generator().manual_seed(0)
    for t in (1e-40, 1e-320, 5e-324):
        assert {next_token(logits, t, 1.0, g) for _ in range(5)} == {1}
        assert next_token(logits, t, 0.5, g) == 1
    with pytest.raises(RuntimeError):
        next_token(torch.tensor([0.0, math.nan]), 1.0, 1.0, g)


def test_reload_after_eviction_rechecks_the_root(setup, tmp_path):
    """An adapter under the root, evicted, then swapped for a symlink leaving the root: the reload is refused."""
    _, _, dirs, _, _ = setup
    root = tmp_path / "root"
    root.mkdir()
    for n in ("x", "y"):
        shutil.copytree(dirs["a1" if n == "x" else "a2"], root / n)
    reg, _ = registry(setup, root=root, max_loaded=1, cache_bytes=0)
    reg.add("x", "x", confined=True)
    reg.add("y", "y", confined=True)  # evicts x
    assert reg.loaded() == ["y"]
    shutil.rmtree(root / "x")
    os.symlink(dirs["a3"], root / "x")
    with pytest.raises(AdapterAccessError, match="outside the adapter root"):
        reg.acquire("x")
    os.unlink(root / "x")
    (root / "x").mkdir()
    shutil.copy(dirs["a1"] / "adapter_config.json", root / "x")
    os.symlink(dirs["a3"] / "adapter_model.safetensors", root / "x" / "adapter_model.safetensors")
    with pytest.raises(AdapterAccessError, match="outside the adapter root"):
        reg.acquire("x")
    assert reg.slots.index_of("x") is None and reg.pinned() == {}
    assert reg.acquire("y")


def test_reads_open_what_was_checked(setup, tmp_path):
    """The worst moments: the directory is swapped for a symlink leaving the root right after a path was
    resolved and checked, before it is opened. Every such read is refused; none reads the other directory."""
    _, _, dirs, _, _ = setup
    root = tmp_path / "root"
    root.mkdir()

    def attempt(swap_at: str):
        inside = root / "inside"
        shutil.copytree(dirs["a1"], inside)
        seen = []

        def check(real, shown):  # the registry's check (inside the root), plus the attacker's swap
            if root.resolve() not in real.parents:
                raise AdapterAccessError(f"{shown} resolves outside the adapter root")
            seen.append(shown)
            if shown.endswith(swap_at):
                os.rename(inside, tmp_path / f"moved-{len(list(tmp_path.iterdir()))}")
                os.symlink(dirs["a2"], inside)

        with pytest.raises(AdapterAccessError) as err:
            read_checked(inside, check)
        os.unlink(inside)
        return str(err.value), seen

    for swap_at in ("inside", "adapter_config.json", "adapter_model.safetensors"):
        message, seen = attempt(swap_at)
        assert "outside the adapter root" in message or "changed while it was being opened" in message, (
            swap_at
        )
    assert "changed while it was being opened" in message and len(seen) == 3
    got = read_checked(tmp_path / "moved-1")
    assert got["adapter_model.safetensors"] == (dirs["a1"] / "adapter_model.safetensors").read_bytes()


def test_unservable_kinds_and_bad_names_are_refused_at_registration(setup, tmp_path):
    """What cannot run per row is refused when registered (loaded now or not), naming the adapter and why."""
    reg, _ = registry(setup, root=tmp_path, max_loaded=2)
    kinds = {"biases": ({"bias": "all"}, "bias='all'"),
             "saved_mlp": ({"modules_to_save": ["layers.0.mlp"]}, "'model.layers.0.mlp' is a LlamaMLP")}  # fmt: skip
    for name, (extra, why) in kinds.items():
        m = tiny_llama(seed=0)
        lorakit.add_adapter(m, lorakit.LoraConfig(r=2, targets=["q_proj"], **extra))
        lorakit.save_adapter(m, tmp_path / name)
        for load in (True, False):
            with pytest.raises(AdapterUnsupported, match=f"adapter {name!r}.*{re.escape(why)}"):
                reg.add(name, tmp_path / name, load=load)
    assert reg.names() == [] and [n for n in reg.slots.names if n is not None] == []
    for bad in ("x" * 5000, "a\0b", "", "a b", "é"):
        with pytest.raises(ValueError, match="adapter name"):
            reg.add(bad, setup[2]["a1"])
    for path in ("a\0b", "x" * 5000):
        with pytest.raises((AdapterAccessError, FileNotFoundError)):
            reg.confine(path, "x")


def test_many_adapters_reload_from_the_cpu_cache(setup):
    """40 names over 4 directories, 2 resident: every output exact, and after registration no disk reads."""
    _, _, dirs, ref, tok = setup
    reg, tok = registry(setup, max_loaded=2)
    names = {f"n{i}": ADAPTERS[i % 4] for i in range(40)}
    for n, d in names.items():
        reg.add(n, dirs[d], load=False)
    reads = reg.disk_reads
    ids = tok.encode(PROMPTS[0])
    want = {d: reference(ref, ids, d, 6, eos=()) for d in ADAPTERS}
    with Engine(reg.model, tok, reg, max_batch=8) as eng:
        reqs = eng.generate([Request(ids, n, 6, temperature=0, ignore_eos=True) for n in names], 120)
    assert [r.output_ids for r in reqs] == [want[d] for d in names.values()]
    assert reg.disk_reads == reads and reg.evictions >= 38 and len(reg.loaded()) <= 2
