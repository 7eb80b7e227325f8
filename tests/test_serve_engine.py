"""The serving engine without HTTP: batched greedy output equals plain one-request decoding, whatever the batch."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import lorakit
from lorakit.models import load_model
from lorakit.serve import AdapterAccessError, AdapterConflict, AdapterRegistry, Engine, Request
from lorakit.serve.sampling import TextStream, next_token
from serve_fixtures import ADAPTERS, reference, served_references

PROMPTS = [
    "hello",
    "the quick brown fox",
    "a",
    "zzz yyy xxx www vvv uuu",
    "abc",
    "q",
    "lorem ipsum dolor",
    "xy",
]
NAMES = [None, "a1", "a2", "a3", "a4", "a1", None, "a3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    return served_references(tmp, PROMPTS, NAMES, 24)


def make_engine(setup, max_batch=4, max_loaded=None):
    model_dir, dirs, *_ = setup
    model, tok = load_model(str(model_dir))
    reg = AdapterRegistry(model, "tiny", max_loaded=max_loaded)
    for n in ADAPTERS:
        reg.add(n, dirs[n], load=False)
    return Engine(model, tok, reg, max_batch=max_batch), reg


def test_batched_greedy_equals_one_at_a_time(setup):
    *_, prompts, refs = setup
    assert len({tuple(r) for r in refs}) == len(refs)  # the adapters really give different outputs
    eng, _ = make_engine(setup, max_batch=4)  # 8 requests, 4 rows: later ones join while others decode
    with eng:
        reqs = eng.generate([Request(p, n, 24, temperature=0) for p, n in zip(prompts, NAMES)], timeout=120)
        alone = [
            eng.generate([Request(p, n, 24, temperature=0)], timeout=60)[0] for p, n in zip(prompts, NAMES)
        ]
    for r, a, ref in zip(reqs, alone, refs):
        assert r.error is None
        assert r.output_ids == ref == a.output_ids
        assert r.finish_reason == ("length" if len(ref) == 24 else "stop")
    assert eng.steps > 0 and eng.rows_stepped / eng.steps > 1.5  # really decoded in batches


def test_requests_joining_mid_decode(setup):
    *_, prompts, refs = setup
    eng, _ = make_engine(setup, max_batch=8)
    started = threading.Event()
    first = Request(prompts[1], "a1", 24, temperature=0, on_delta=lambda r, d: started.set())
    with eng:
        eng.submit(first)
        assert started.wait(60)
        late = eng.generate([Request(p, n, 24, temperature=0) for p, n in zip(prompts[2:5], NAMES[2:5])], 60)
        first.done.wait(60)
    assert first.output_ids == refs[1]
    assert [r.output_ids for r in late] == refs[2:5]


def test_lru_eviction_keeps_outputs_exact(setup):
    *_, prompts, refs = setup
    eng, reg = make_engine(setup, max_batch=8, max_loaded=2)
    with eng:
        reqs = eng.generate([Request(p, n, 24, temperature=0) for p, n in zip(prompts, NAMES)], timeout=120)
    assert [r.output_ids for r in reqs] == refs
    assert len(reg.loaded()) <= 2 and reg.evictions > 0
    assert lorakit.adapter_records(eng.model) == {}  # resident in slots only, never adapter records
    assert len([n for n in reg.slots.names if n is not None]) <= 2


def test_seeded_sampling_does_not_depend_on_the_batch(setup):
    *_, prompts, _ = setup
    eng, _ = make_engine(setup, max_batch=8)

    def sampled():
        return Request(prompts[3], "a2", 20, temperature=0.9, top_p=0.95, seed=1234)

    with eng:
        alone = eng.generate([sampled()], 60)[0]
        crowd = eng.generate([Request(p, n, 20, temperature=1.0, seed=i) for i, (p, n) in
                              enumerate(zip(prompts, NAMES))] + [sampled()], 60)  # fmt: skip
        other_seed = eng.generate([Request(prompts[3], "a2", 20, temperature=0.9, top_p=0.95, seed=99)], 60)[
            0
        ]
    assert alone.output_ids == crowd[-1].output_ids
    assert other_seed.output_ids != alone.output_ids


def test_stop_strings_and_cancel(setup):
    _, _, tok, prompts, refs = setup
    full = tok.decode(refs[2], skip_special_tokens=True)
    stop = full[5:7]
    eng, _ = make_engine(setup)
    with eng:
        r = eng.generate([Request(prompts[2], "a2", 24, temperature=0, stop=["#never#", stop])], 60)[0]
        c = Request(prompts[0], None, 24, temperature=0)
        c.cancelled = True
        eng.generate([c], 60)
    assert r.finish_reason == "stop" and r.text == full[: full.find(stop)]
    assert c.finish_reason == "cancelled"


def test_text_stream_holds_back_possible_stop_strings(setup):
    tok = setup[2]
    s = TextStream(tok, ["abc"])
    out = [s.push(t) for t in tok.encode("xyab")]
    assert "".join(out) == "xy"  # "ab" may start "abc": held back
    assert s.push(tok.encode("d")[0]) == "abd" and not s.stopped
    assert s.push(tok.encode("a")[0]) == "" and s.push(tok.encode("b")[0]) == ""
    assert s.push(tok.encode("c")[0]) == "" and s.stopped and s.text == "xyabd"


def test_next_token_greedy_and_top_p():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert next_token(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 1.0, 0.01, g) for _ in range(20)} == {1}  # top_p keeps the top token only
    assert {next_token(logits, 1.0, 0.6, g) for _ in range(200)} == {1, 2}


def test_prompt_too_long_and_unknown_adapter(setup):
    *_, prompts, _ = setup
    eng, _ = make_engine(setup)
    with pytest.raises(ValueError, match="maximum context length is 128"):
        eng.submit(Request(prompts[0], None, 128))
    with pytest.raises(KeyError, match="nope"):
        eng.submit(Request(prompts[0], "nope", 4))


def test_registry_root_confinement(setup, tmp_path):
    model_dir, dirs, *_ = setup
    model, _ = load_model(str(model_dir))
    root = tmp_path / "root"
    (root / "nested").mkdir(parents=True)
    os.symlink(dirs["a1"], root / "escape")  # a directory symlink leaving the root
    (root / "files").mkdir()
    for f in os.listdir(dirs["a2"]):
        os.symlink(dirs["a2"] / f, root / "files" / f)  # files symlinked from outside
    import shutil

    shutil.copytree(dirs["a3"], root / "inside")
    shutil.copytree(dirs["a4"], root / "nested" / "x")  # load_adapter("nested", name="x") reads nested/x
    reg = AdapterRegistry(model, "tiny", root=root, max_loaded=4)
    for bad in ("../adapters/a1", str(dirs["a1"]), "escape", "files"):
        with pytest.raises(AdapterAccessError, match="outside the adapter root"):
            reg.confine(bad, "x")
    os.symlink(dirs["a1"], root / "nested" / "y")
    with pytest.raises(AdapterAccessError):
        reg.confine("nested", "y")  # the nested directory load_adapter would read escapes
    assert reg.confine("inside", "in") == (root / "inside").resolve()
    assert reg.confine("nested", "x") == (root / "nested" / "x").resolve()
    with pytest.raises(FileNotFoundError):
        reg.confine("missing", "m")
    reg.add("in", reg.confine("inside", "in"))
    with pytest.raises(AdapterConflict):
        reg.add("in", root / "inside")
    with pytest.raises(AdapterConflict):
        reg.add("tiny", root / "inside")
    assert AdapterRegistry(model, "tiny").root is None
    with pytest.raises(AdapterAccessError, match="--adapter-root"):
        AdapterRegistry(model, "tiny").confine("inside", "x")


def test_registry_remove_waits_for_running_requests(setup):
    model_dir, dirs, *_ = setup
    model, _ = load_model(str(model_dir))
    reg = AdapterRegistry(model, "tiny", max_loaded=1)
    reg.add("a1", dirs["a1"])
    reg.add("a2", dirs["a2"])  # evicts a1 (idle)
    assert reg.loaded() == ["a2"]
    assert reg.acquire("a2")
    assert not reg.acquire("a1")  # the only slot is pinned
    reg.remove("a2")
    assert not reg.is_known("a2") and reg.slots.index_of("a2") is not None  # still resident while pinned
    reg.release("a2")
    assert reg.slots.index_of("a2") is None
    assert reg.acquire("a1") and reg.loaded() == ["a1"]


def test_model_modules_is_named_modules_without_adapter_internals():
    from conftest import tiny_llama
    from lorakit.inject import model_modules
    from lorakit.layers import LoraLayer, SavedModule

    m = tiny_llama(tie=True)
    lorakit.add_adapter(
        m, lorakit.LoraConfig(r=2, targets="all-linear", trainable_token_indices=[3]), name="x"
    )
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["norm"]), name="y")
    skip, want = [], []
    for name, module in m.named_modules():  # the definition, written the slow way
        if any(name.startswith(s + ".") or name == s for s in skip):
            continue
        if isinstance(module, LoraLayer):
            skip += [f"{name}.lora", f"{name}.tokens"]
        if isinstance(module, SavedModule):
            skip.append(f"{name}.lora_copies")
        want.append((name, module))
    got = model_modules(m)
    assert [n for n, _ in got] == [n for n, _ in want] and all(a is b for (_, a), (_, b) in zip(got, want))
    assert any(n.endswith("q_proj") for n, _ in got) and not any(".lora." in f"{n}." for n, _ in got)


def test_adapter_loads_between_steps_of_running_requests(setup):
    model_dir, dirs, tok, prompts, refs = setup
    eng, reg = make_engine(setup, max_batch=8)
    started = threading.Event()
    long = Request(prompts[1], "a1", 100, temperature=0, ignore_eos=True, on_delta=lambda r, d: started.set())
    with eng:
        eng.submit(long)
        assert started.wait(60)
        eng.call(lambda: reg.add("late", dirs["a4"])).result(60)
        assert not long.done.is_set()  # the load ran between two steps; it did not wait for the request
        late = eng.generate([Request(prompts[4], "late", 24, temperature=0)], 60)[0]
        eng.call(lambda: reg.remove("late")).result(60)
        long.done.wait(60)
    assert late.output_ids == refs[4]  # a4's file under another name gives a4's outputs
    ref, _ = load_model(str(model_dir))
    lorakit.load_adapter(ref, dirs["a1"], name="a1")
    assert long.output_ids == reference(ref, prompts[1], "a1", 100, eos=()) and len(long.output_ids) == 100
    assert reg.slots.index_of("late") is None and not reg.resident("late")


def test_batched_and_chunked_prefill_equal_one_at_a_time(setup):
    """Prompts prefilled together (left-padded) and long ones in chunks of 5 give the one-at-a-time tokens, and
    a running row keeps decoding while a long prompt is prefilled chunk by chunk."""
    model_dir, dirs, tok, prompts, refs = setup
    eng, _ = make_engine(setup, max_batch=8)
    eng.prefill_chunk = 5
    with eng:
        reqs = eng.generate([Request(p, n, 24, temperature=0) for p, n in zip(prompts, NAMES)], timeout=120)
        assert eng.prefill_rows > eng.prefills  # some prefills held several prompts
        assert eng.prefills > len({tuple(p) for p in prompts if len(p) <= 5})  # long ones took several chunks
        times: list[float] = []
        running = Request(prompts[0], "a1", 60, temperature=0, ignore_eos=True,
                          on_delta=lambda r, d: times.append(time.perf_counter()))  # fmt: skip
        eng.submit(running)
        while len(times) < 2:
            time.sleep(0.01)
        long_prompt = tok.encode("the quick brown fox jumps over the lazy dog " * 2)
        late = eng.generate([Request(long_prompt, "a2", 8, temperature=0)], timeout=60)[0]
        running.done.wait(60)
    assert [r.output_ids for r in reqs] == refs
    assert sum(late.submitted < t < late.first_token for t in times) >= 3  # decoded between its chunks
    ref, _ = load_model(str(model_dir))
    lorakit.load_adapter(ref, dirs["a2"], name="a2")
    assert late.output_ids == reference(ref, long_prompt, "a2", 8)


def test_rows_decode_in_slot_order_on_views(setup):
    """The engine keeps its rows in slot order (not name order: a3 is made resident before a1, so it has the
    lower slot), base rows last, and prefills them in that order too; with two rows per slot every decode
    step's mapping is in place order (the grouped pair on views, nothing gathered), and the outputs stay each
    request's own."""
    *_, prompts, refs = setup
    eng, reg = make_engine(setup, max_batch=5)
    assert reg.acquire("a3") and reg.acquire("a1")
    reg.release("a3"), reg.release("a1")
    assert reg.slot("a3") < reg.slot("a1")
    picks = [1, 3, 5, 7, 0]  # a1, a3, a1, a3, base
    steps, prefills, forward = [], [], eng._forward

    def spy(adapters, cache, **inputs):
        if inputs["input_ids"].shape[1] == 1 and len(adapters) == 5:  # a decode step of the full batch
            steps.append((list(adapters), reg.slots.mapping(adapters).in_order))
        elif inputs["input_ids"].shape[1] > 1:
            prefills.append(list(adapters))
        return forward(adapters, cache, **inputs)

    eng._forward = spy
    reqs = eng.generate([Request(prompts[i], NAMES[i], 24, temperature=0) for i in picks], timeout=120)
    assert [r.output_ids for r in reqs] == [refs[i] for i in picks]
    assert steps and all(s == (["a3", "a3", "a1", "a1", None], True) for s in steps)
    order = {"a3": 0, "a1": 1, None: 2}
    assert prefills and all(p == sorted(p, key=order.get) for p in prefills) and max(map(len, prefills)) > 1


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_kv_cache_passed_under_the_name_the_model_takes(setup, argument):
    """transformers 5.x names the KV cache `cache` and warns that `past_key_values` goes in 5.40; older
    releases take only `past_key_values`. The engine passes it under the name the model's forward has (no
    deprecation warning), and the outputs are the same either way (prefill groups, chunks and decode)."""
    import warnings

    model_dir, dirs, *_, prompts, refs = setup
    model, tok = load_model(str(model_dir))
    if argument == "past_key_values":  # a model whose forward predates the rename
        new = type(model).forward

        def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0):  # fmt: skip
            return new(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)  # fmt: skip

        model.forward = forward
    reg = AdapterRegistry(model, "tiny")
    for n in ADAPTERS:
        reg.add(n, dirs[n], load=False)
    eng = Engine(model, tok, reg, max_batch=4, prefill_chunk=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reqs = eng.generate([Request(p, n, 24, temperature=0) for p, n in zip(prompts, NAMES)], timeout=120)
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert [r.output_ids for r in reqs] == refs
    assert not [w for w in caught if "past_key_values" in str(w.message)]
